"""Bad model options are one clear ConfigError naming the value."""
import pytest

from big_vision.config_parsing import ConfigError
from big_vision.models import ae


@pytest.mark.parametrize("option,value,match", [
    ("image_size", 0, r"image_size=0 must be a positive int or a pair of them"),
    ("image_size", (16, -16), r"image_size=\(16, -16\) must be a positive int"),
    ("image_size", "16", r"image_size='16' must be a positive int"),
    ("channels", 0, r"channels=0 must be an int >= 1"),
    ("num_cls_tokens", -1, r"num_cls_tokens=-1 must be an int >= 0"),
    ("num_classes", 2.5, r"num_classes=2.5 must be an int >= 0"),
    ("decoder_depth", -1, r"decoder_depth=-1 must be an int >= 0"),
    ("decoder_mlp_dim", 0, r"decoder_mlp_dim=0 must be an int >= 1"),
])
def test_bad_model_option_is_clear(option, value, match):
  with pytest.raises(ConfigError, match=match):
    ae.build_model({"variant": "Mu/4", "image_size": 16, option: value})


def test_good_model_options_still_build():
  m = ae.build_model(dict(variant="Mu/4", image_size=(16, 8), channels=1, num_cls_tokens=0,
                          num_classes=0, decoder_depth=1, decoder_mlp_dim=32))
  assert m.grid == (4, 2) and m.num_cls_tokens == 0
