from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fmnist import config, data, models
from fmnist.errors import ModelError


@pytest.mark.parametrize("name", models.names())
def test_every_model_gives_finite_logits(name):
    torch.manual_seed(0)
    m = models.create(name)
    m.eval()
    out = m(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("scheme", config.INITS)
def test_every_init_on_every_model_trains_a_step(name, scheme):
    torch.manual_seed(0)
    m = models.init_weights(models.create(name), scheme)
    loss = nn.functional.cross_entropy(m(torch.randn(4, 1, 28, 28)), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_unknown_model_lists_known():
    with pytest.raises(models.ModelError) as e:
        models.create("transformer9000")
    assert "mlp" in str(e.value) and "cnn" in str(e.value)


def test_unknown_argument_is_a_model_error():
    with pytest.raises(models.ModelError, match="mlp"):
        models.create("mlp", widht=3)


def test_mlp_shape_follows_hidden_sizes():
    m = models.create("mlp", hidden=(64, 32, 16), dropout=0.1, batch_norm=True)
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(784, 64), (64, 32), (32, 16), (16, 10)]
    assert sum(isinstance(x, nn.BatchNorm1d) for x in m.modules()) == 3
    assert sum(isinstance(x, nn.Dropout) for x in m.modules()) == 3


def test_xavier_uniform_bounds_and_zero_bias():
    torch.manual_seed(0)
    m = models.init_weights(models.create("mlp", hidden=(256, 128)), "xavier")
    first = models.first_layer(m)
    bound = math.sqrt(6 / (784 + 256))
    assert first.weight.abs().max() <= bound
    assert first.weight.abs().max() > 0.95 * bound  # uniform fills the range
    assert torch.count_nonzero(first.bias) == 0


def test_normal_init_uses_the_given_std():
    torch.manual_seed(0)
    m = models.init_weights(models.create("mlp"), "normal", std=0.05)
    assert models.first_layer(m).weight.std().item() == pytest.approx(0.05, rel=0.02)


def test_kaiming_std():
    torch.manual_seed(0)
    w = models.first_layer(models.init_weights(models.create("mlp"), "kaiming")).weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / 784), rel=0.03)


def test_default_init_leaves_pytorch_weights():
    torch.manual_seed(0)
    a = models.create("mlp")
    torch.manual_seed(0)
    b = models.init_weights(models.create("mlp"), "default")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", config.ACTIVATIONS)
def test_every_activation_name_builds_its_module(name):
    m = models.create("mlp", hidden=(8,), activation=name, batch_norm=False)
    act = m.net[2]
    assert type(act).__name__ == config.ACTIVATIONS[name]
    x = torch.linspace(-3, 3, 7)
    oracle = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh,
              "sigmoid": torch.sigmoid, "leaky_relu": nn.functional.leaky_relu}[name]
    assert torch.equal(act(x), oracle(x))


def test_neuron_weights_are_rows_of_the_first_layer():
    m = models.create("mlp")
    pics = models.neuron_weights(m, [50, 7])
    assert pics.shape == (2, 28, 28)
    assert torch.equal(pics[0].flatten(), models.first_layer(m).weight[49].detach())
    assert torch.equal(pics[1].flatten(), models.first_layer(m).weight[6].detach())
    for outside in (257, 0):  # runs.resolve refuses these before a run; here they are a bug, never a wrap-around
        with pytest.raises(IndexError):
            models.neuron_weights(m, [outside])


def test_cnn_neurons_are_filters():
    m = models.create("cnn")
    assert models.neuron_weights(m, [1, 32]).shape == (2, 3, 3)


def test_multiply_adds_match_a_hand_count():
    assert models.macs_per_image(models.create("mlp")) == 784 * 256 + 256 * 128 + 128 * 10
    # each block: its first conv at the size it receives, its second at half that
    convs = (28 * 28 * 32 * 1 * 9 + 14 * 14 * 32 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 7 * 7 * 64 * 64 * 9
             + 7 * 7 * 128 * 64 * 9 + 3 * 3 * 128 * 128 * 9)
    assert models.macs_per_image(models.create("cnn")) == convs + 3 * 3 * 128 * 10


@pytest.mark.parametrize("shape", [(3, 4, 28, 28), (2, 8, 7, 7), (2, 3, 5, 6)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_cnn_max_pool_gives_max_pool2d_values_outside_autograd_and_its_gradient_inside(shape, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).to(memory_format=fmt)
    x[0, 0, 0, :2] = 5.0  # a tie: the gradient goes where max_pool2d's indices say
    want = nn.functional.max_pool2d(x, 2)
    pool = models.MaxPool2x2()
    with torch.no_grad():
        assert torch.equal(pool(x), want)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    pool(a).sum().backward()
    nn.functional.max_pool2d(b, 2).sum().backward()
    assert torch.equal(a.grad, b.grad)
    assert isinstance(models.create("cnn").net[1], models.MaxPool2x2)


def test_a_strided_stem_leaves_nothing_but_its_conv_at_full_size():
    pool, stride = models.create("cnn"), models.create("cnn", stem="stride")
    sizes = {}

    def size(module, inputs, output) -> None:  # None: the output stays
        sizes[module] = (inputs[0].shape[-1], output.shape[-1])

    for m in stride.modules():
        if not list(m.children()):
            m.register_forward_hook(size)
    assert stride(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert [type(m).__name__ for m, (i, o) in sizes.items() if i == 28] == ["Conv2d"]  # 28 in, 14 out
    assert not any(isinstance(m, nn.MaxPool2d) and i == 28 for m, (i, o) in sizes.items())
    first = 28 * 28 * 32 * 9  # the pool stem's conv at 28x28; the strided one has 14x14 outputs of 4x4 taps
    assert models.macs_per_image(pool) - models.macs_per_image(stride) == first - 14 * 14 * 32 * 16
    with pytest.raises(ModelError, match="takes no 'stem'"):
        models.create("mlp", stem="stride")


def test_a_whitening_stem_has_no_padding_and_starts_as_the_patches_whitening():
    gen = torch.Generator().manual_seed(0)
    # images with a structure (ramps of random slope) and noise: patches of correlated pixels
    ramp = torch.linspace(0, 180, 28).repeat(28, 1)
    images = (ramp * torch.rand(200, 1, 1, generator=gen) + 60 * torch.rand(200, 28, 28, generator=gen))
    images = images.clamp(0, 255).to(torch.uint8)
    m = models.create("cnn", stem="whiten")
    conv = m.net[0]
    assert conv.weight.shape == (32, 1, 3, 3) and conv.padding == (0, 0) and conv.weight.requires_grad
    before = conv.weight.detach().clone()
    models.whiten_stem(m, images)
    w = conv.weight.detach().reshape(32, 9).double()
    assert torch.allclose(w[9:18], -w[:9])
    assert torch.equal(conv.weight.detach()[18:], before[18:])  # a 3x3 patch has 9 directions; the rest keep theirs
    # whitening: the first 9 filters' outputs over every patch are decorrelated, each of about unit variance
    x = ((images.double() / 255 - data.MEAN) / data.STD).unsqueeze(1)
    out = nn.functional.conv2d(x, conv.weight.double())
    assert out.shape[-2:] == (26, 26)
    out = out[:, :9].permute(1, 0, 2, 3).reshape(9, -1)
    assert torch.allclose(torch.cov(out), torch.eye(9, dtype=torch.float64), atol=0.03)
    norms = w[:9].norm(dim=1)
    assert torch.all(norms[1:] >= norms[:-1])  # the directions of most variance first (the least scaled)

    sizes = []
    for layer in m.net:
        if isinstance(layer, nn.Conv2d):
            layer.register_forward_hook(lambda mod, i, o: sizes.append(o.shape[-1]))
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sizes == [26, 13, 13, 6, 6, 3]  # every layer after the first on fewer pixels than 28 -> 14 -> 7 -> 3
    assert models.macs_per_image(m) < 0.85 * models.macs_per_image(models.create("cnn"))
    narrow = models.create("cnn", channels=[16, 32], stem="whiten")
    models.whiten_stem(narrow, images)
    w = narrow.net[0].weight.detach().reshape(16, 9)
    assert torch.equal(w[8:], -w[:8]) and narrow(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("name", models.names())
def test_every_model_trains_a_dry_run_and_reports_its_size(name, tiny_dir, tmp_path):
    from fmnist import train
    from fmnist.config import TrainConfig

    cfg = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path), name=name, model=name, dry_run=True,
                      batch_size=32, val_size=100, device="cpu", plots=False, threads=1)
    run = train.fit(cfg)
    model = models.create(name)
    assert run.summary["parameters"] == models.count_parameters(model)
    assert run.summary["macs_per_image"] == models.macs_per_image(model) > 0


def test_resnet_stages_and_blocks():
    m = models.create("resnet", channels=[8, 16, 32], blocks=3)
    blocks = [b for b in m.modules() if isinstance(b, models.ResidualBlock)]
    assert len(blocks) == 9
    projections = [b for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(projections) == 2  # where the width doubles and the resolution halves: 28 -> 14 -> 7
    feats = m.net[:-3](torch.randn(2, 1, 28, 28))  # before pooling
    assert feats.shape == (2, 32, 7, 7)
    with pytest.raises(models.ModelError, match="blocks"):
        models.create("mlp", blocks=2)


@pytest.mark.parametrize("name", models.names())
def test_every_model_owns_a_search_space_of_its_own_settings(name):
    space = models.search_space(name)
    argument, count, width = space.layers
    takes = models.defaults(name)
    assert argument in takes and count in space.entries and width in space.entries
    assert all(k in takes for k in space.entries if k not in (count, width))
    space.entries.clear()  # a copy: the registry's space is unchanged
    assert models.search_space(name).entries


def test_a_space_naming_settings_the_model_lacks_cannot_be_registered():
    with pytest.raises(ValueError, match="does not take"):
        @models.register("broken", space=models.SearchSpace(("hidden", "depth", "width"),
                                                            {"depth": 1, "width": [8], "blocks": [2]}))
        def broken(hidden=(8,)):
            return models.MLP(tuple(hidden), "relu", 0.0, False)
    assert "broken" not in models.names()
