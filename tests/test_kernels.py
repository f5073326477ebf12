"""New history kernels for training: initialisation from the k1 projection, save and load."""

import torch
import torch.nn.functional as F

from framepack.model import HistoryGroup, PackedTransformer, get_spec, load_transformer, save_transformer


def _section_inputs(cfg, history):
    g = torch.Generator().manual_seed(3)
    return dict(
        noisy=torch.randn(1, 16, 2, 16, 16, generator=g),
        noisy_indices=torch.tensor([1, 2]),
        history=history,
        timestep=torch.tensor([500.0]),
        text=torch.randn(1, 5, cfg.text_embed_dim, generator=g),
        text_mask=None,
        pooled=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        guidance=torch.tensor([10000.0]),
        image_embeds=torch.randn(1, 4, cfg.image_proj_dim, generator=g),
    )


def test_k8_projection_equals_pooling_then_base_projection():
    torch.manual_seed(0)
    model = PackedTransformer(get_spec("tiny")).eval()
    model.add_history_kernel("k8")
    assert model.config.clean_kernels[-1] == "k8"
    x = torch.randn(1, 16, 8, 16, 16)
    with torch.no_grad():
        big = model.clean_x_embedder.proj_8x(x)  # (1, D, 1, 1, 1)
        pooled = F.avg_pool3d(x, (8, 8, 8))  # (1, 16, 1, 2, 2): latent average over the kernel ratio
        base = model.clean_x_embedder.proj
        expected = F.conv3d(pooled, base.weight, base.bias, stride=(1, 2, 2))  # (1, D, 1, 1, 1)
    torch.testing.assert_close(big, expected, rtol=1e-5, atol=1e-5)


def test_model_with_added_kernel_round_trips(tmp_path):
    torch.manual_seed(0)
    model = PackedTransformer(get_spec("tiny")).eval()
    model.add_history_kernel("k8")
    history = [
        HistoryGroup(torch.randn(1, 16, 1, 16, 16), torch.tensor([0]), "k1"),
        HistoryGroup(torch.randn(1, 16, 8, 16, 16), torch.arange(3, 11), "k8"),
    ]
    inputs = _section_inputs(model.config, history)
    with torch.no_grad():
        before = model.forward_packed(**inputs)
    save_transformer(model, tmp_path / "ckpt")
    loaded = load_transformer(tmp_path / "ckpt")
    assert loaded.config.clean_kernels == ("k1", "k2", "k4", "k8")
    with torch.no_grad():
        after = loaded.forward_packed(**inputs)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
