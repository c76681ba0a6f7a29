"""Frame encoders: shapes, frame-causality, and the real timm / V-JEPA 2 loading code on tiny local models."""
import pytest
import torch

from lawm.models import EncoderConfig, align_actions, build_encoder


def assert_frame_causal(enc, t=6, size=32):
    """Perturbing frames after t leaves every output of representations ending at or before t unchanged."""
    torch.manual_seed(0)
    x = torch.rand(2, t, 3, size, size)
    base = enc(x)
    u = enc.tubelet
    assert base.shape == (2, t // u, enc.grid[0] * enc.grid[1], enc.dim)
    for cut in range(1, t):
        y = x.clone()
        y[:, cut:] = torch.rand_like(y[:, cut:])
        out = enc(y)
        done = cut // u  # representations whose frames are all < cut
        assert torch.equal(out[:, :done], base[:, :done]), f"cut at frame {cut}"
        assert not torch.allclose(out[:, done:], base[:, done:])


def test_patch_encoder_raw_and_projected():
    raw = build_encoder(EncoderConfig())
    assert (raw.dim, raw.grid, raw.tubelet) == (48, (8, 8), 1)
    x = torch.rand(1, 2, 3, 32, 32)
    # a token is exactly its 4x4 patch
    assert torch.equal(raw(x)[0, 1, 9].view(4, 4, 3), x[0, 1, :, 4:8, 4:8].permute(1, 2, 0))
    proj = build_encoder(EncoderConfig(proj_dim=32, seed=3))
    assert proj.dim == 32
    assert_frame_causal(raw)
    assert_frame_causal(proj)
    assert not any(p.requires_grad for p in proj.parameters()) and not proj.training
    assert torch.equal(proj(x), build_encoder(EncoderConfig(proj_dim=32, seed=3))(x))  # fixed by the seed


def test_timm_encoder_loads_local_checkpoint(tmp_path):
    import timm

    ref = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    torch.nn.init.normal_(ref.cls_token)  # make sure the weights really come from the file
    path = tmp_path / "tiny_vit.pth"
    torch.save(ref.state_dict(), path)
    enc = build_encoder(EncoderConfig(kind="timm", timm_name="test_vit", image_size=32, weights=str(path)))
    assert enc.grid == (2, 2) and enc.dim == ref.num_features and enc.tubelet == 1
    x = torch.rand(2, 3, 3, 32, 32)
    want = ref.eval().forward_features((x[:, 1] - enc.mean) / enc.std)[:, ref.num_prefix_tokens:]
    torch.testing.assert_close(enc(x)[:, 1], want)
    enc.train()
    assert not enc.training  # frozen encoders stay in eval
    assert_frame_causal(enc, t=4)


@pytest.fixture(scope="module")
def tiny_vjepa2(tmp_path_factory):
    from transformers import VJEPA2Config, VJEPA2Model

    cfg = VJEPA2Config(patch_size=8, crop_size=32, frames_per_clip=4, tubelet_size=2, hidden_size=48,
                       num_attention_heads=2, num_hidden_layers=2, mlp_ratio=2.0, pred_hidden_size=24,
                       pred_num_attention_heads=2, pred_num_hidden_layers=1, num_pooler_layers=1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vjepa2")
    VJEPA2Model(cfg).save_pretrained(path)
    return path


def test_vjepa2_pairs_are_encoded_independently(tiny_vjepa2):
    enc = build_encoder(EncoderConfig(kind="vjepa2", image_size=32, weights=str(tiny_vjepa2)))
    assert (enc.dim, enc.grid, enc.tubelet) == (48, (4, 4), 2)
    x = torch.rand(1, 5, 3, 32, 32)  # odd length: the last frame has no partner and is dropped
    out = enc(x)
    assert out.shape == (1, 2, 16, 48)
    single = enc(x[:, 2:4])  # pair 1 alone gives the same representation
    torch.testing.assert_close(out[:, 1:2], single)
    assert_frame_causal(enc, t=6)


def test_vjepa2_duplicate_mode_gives_one_representation_per_frame(tiny_vjepa2):
    enc = build_encoder(EncoderConfig(kind="vjepa2", image_size=32, weights=str(tiny_vjepa2),
                                      vjepa2_tubelet="duplicate"))
    assert enc.tubelet == 1
    x = torch.rand(1, 3, 3, 32, 32)
    pairs = build_encoder(EncoderConfig(kind="vjepa2", image_size=32, weights=str(tiny_vjepa2)))
    torch.testing.assert_close(enc(x)[:, 2], pairs(x[:, [2, 2]])[:, 0])
    assert_frame_causal(enc, t=4)
    # resizing: 48 px frames are brought to the configured 32 px
    assert enc(torch.rand(1, 2, 3, 48, 48)).shape == (1, 2, 16, 48)


def test_align_actions():
    a = torch.arange(7.0).view(1, 7, 1)  # 8 frames -> a_0..a_6
    assert torch.equal(align_actions(a, 1), a)
    # tubelet 2: 4 representations ending at frames 1, 3, 5, 7 -> latent k spans a_{2k+1}, a_{2k+2}
    assert align_actions(a, 2)[0, :, 0].tolist() == [1 + 2, 3 + 4, 5 + 6]
    assert align_actions(a, 2, "stack")[0].tolist() == [[1, 2], [3, 4], [5, 6]]
