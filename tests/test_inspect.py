"""gam_triton.inspect.attention_maps: the channel gate and spatial map a block applies, before and after conversion."""
import pytest
import torch

from gam_triton import GAM
from gam_triton.inspect import attention_maps
from gam_triton.reference import PaperGAM, SeedGAM, YoloGAM

@pytest.mark.parametrize("form, sigmoid, shuffle", [(lambda: YoloGAM(16, 16), False, 4),
                                                    (lambda: PaperGAM(16), True, None),
                                                    (lambda: SeedGAM(16, 16), False, None)])
def test_attention_maps_are_what_the_block_applies(device, form, sigmoid, shuffle):
    torch.manual_seed(0)
    ref = form().to(device).eval()
    x = torch.randn(2, 16, 5, 6, device=device)
    before = attention_maps(ref, x)
    after = attention_maps(GAM.from_module(ref).eval(), x)
    for m in (before, after):
        assert m.channel_sigmoid == sigmoid and m.shuffle_groups == shuffle
        assert m.channel_gate.shape == m.spatial_map.shape == x.shape
        assert m.residual < 1e-5
        assert ((m.spatial_map > 0) & (m.spatial_map < 1)).all()
    torch.testing.assert_close(after.channel_gate, before.channel_gate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.spatial_map, before.spatial_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.out, ref(x), atol=1e-5, rtol=1e-5)
    if sigmoid:
        assert ((before.channel_gate > 0) & (before.channel_gate < 1)).all()
    else:  # the YOLO and seed forms multiply by the MLP's raw output
        assert (before.channel_gate < 0).any()


def test_attention_maps_reject_bad_input():
    gam = GAM(16).eval()
    with pytest.raises(TypeError, match="nn.Module"):
        attention_maps("not a module", torch.randn(1, 16, 2, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        attention_maps(gam, [[1.0]])
    with pytest.raises(ValueError, match="4-D"):
        attention_maps(gam, torch.randn(16, 2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        attention_maps(gam, torch.ones(1, 16, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="16 channels"):
        attention_maps(gam, torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match="train mode"):
        attention_maps(gam.train(), torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match="not a GAM block"):
        attention_maps(torch.nn.Linear(4, 4).eval(), torch.randn(1, 4, 2, 2))

