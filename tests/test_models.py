import pytest
import torch

from confide.exceptions import ModelError
from confide.models import build_model
from confide.parameters import get_flat_params, num_params, set_flat_params


def test_lenet_is_the_niid_bench_cnn():
    m = build_model("lenet", input_shape=(1, 28, 28), num_classes=10)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [6, 16]
    assert [lin.out_features for lin in linears] == [120, 84, 10]


def test_lenet_refuses_flat_data():
    with pytest.raises(ModelError, match="lenet"):
        build_model("lenet", input_shape=(64,), num_classes=10)


def test_user_factory_and_unknown():
    m = build_model("torch.nn:Identity", input_shape=(3,), num_classes=2)
    assert isinstance(m, torch.nn.Identity)
    with pytest.raises(ModelError, match="unknown model 'resnet'"):
        build_model("resnet", input_shape=(3,), num_classes=2)
    with pytest.raises(ModelError, match="cannot import"):
        build_model("no_such_module_xyz:f", input_shape=(3,), num_classes=2)


def test_flat_params_round_trip():
    m = build_model("mlp", input_shape=(8,), num_classes=3, hidden_units=5)
    flat = get_flat_params(m)
    assert flat.numel() == num_params(m)
    set_flat_params(m, flat * 2)
    assert torch.allclose(get_flat_params(m), flat * 2)
