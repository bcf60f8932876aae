"""torch.compile of a model holding gam_triton's GAM: one graph (the ops are custom ops), same numbers."""
import pytest
import torch

from gam_cases import assert_close, make_input, make_ref
from gam_triton import GAM


@pytest.mark.gpu_check
def test_compiled_gam_matches_eager_fullgraph(device):
    ref = make_ref("yolo_grouped", 32).to(device).eval()
    gam = GAM.from_module(ref).eval()
    compiled = torch.compile(gam, fullgraph=True, dynamic=False)
    x = make_input(2, 32, 5, 4, torch.float32, device, False)
    with torch.no_grad():
        assert_close(compiled(x), ref(x), torch.float32)
        x2 = make_input(1, 32, 3, 6, torch.float32, device, True, seed=4)  # new shape: recompiles
        assert_close(compiled(x2), ref(x2), torch.float32)


@pytest.mark.gpu_check
def test_compiled_gam_train_step_gradients(device):
    ref = make_ref("paper", 24).to(device).train()
    gam = GAM.from_module(ref).train()
    compiled = torch.compile(gam, dynamic=False)
    x = make_input(2, 24, 4, 4, torch.float32, device, False)
    compiled(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, p), q in zip(gam.named_parameters(), ref.parameters()):
        n = max(q.grad.abs().max().item(), 1.0)
        assert_close(p.grad / n, q.grad / n, torch.float32, 5, name)
