"""to_semi_structured: 2:4 detection and refusals on CPU; the conversion itself on a capable GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_prune import Pruner, PruningOptions, Schedule
from lightning_prune.export import is_two_four, to_semi_structured, two_four_fraction

CUDA_8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def two_four_model(dtype: torch.dtype = torch.bfloat16) -> nn.Sequential:
    """fc 128->256 and 256->128 pruned to 2:4 by the library's own pattern, then a dense head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    pruner = Pruner(
        model, Schedule(start_step=0, end_step=0), PruningOptions(target_sparsity=0.5, pattern="2:4")
    )
    pruner.prune(0.5)
    return model.to(dtype)


def test_detection_follows_the_nm_pattern_grouping() -> None:
    model = two_four_model(torch.float32)
    assert is_two_four(model[0].weight) and is_two_four(model[2].weight)
    assert not is_two_four(model[4].weight) and two_four_fraction(model[4].weight) == 0.0
    shifted = torch.zeros(4, 8)
    shifted[:, 1:4] = 1.0  # three non-zeros in the first group of 4: not 2:4
    assert not is_two_four(shifted) and two_four_fraction(shifted) == 0.5
    aligned = torch.tensor([[1.0, 0, 1, 0, 0, 1, 1, 0]])
    assert is_two_four(aligned)
    assert not is_two_four(torch.zeros(4, 6)), "input size not a multiple of 4"
    with pytest.raises(ValueError, match=r"shape \(4, 6\) must be 2-D with an input size divisible by 4"):
        two_four_fraction(torch.zeros(4, 6))


def test_dry_run_reports_every_linear_layer_without_a_gpu() -> None:
    model = two_four_model()
    model.append(nn.Linear(10, 16))  # in_features not a multiple of 4
    small = nn.Linear(8, 8).to(torch.bfloat16)
    with torch.no_grad():
        small.weight.zero_()  # 2:4, but too small for the kernels
    model.append(small)
    result = to_semi_structured(model, dry_run=True)
    assert result.converted == ["0", "2"]
    assert "not 2:4 sparse: 100.0% of its groups" in result.skipped["4"]
    assert "in_features=10 is not a multiple of 4" in result.skipped["5"]
    assert "kernel needs out_features a multiple of" in result.skipped["6"]
    assert result.model is model and result.backend is None
    assert "dry run" in str(result) and "converted 0" in str(result)


def test_attention_out_proj_is_left_to_its_module() -> None:
    attention = nn.MultiheadAttention(64, 4).to(torch.float16)
    with torch.no_grad():
        attention.out_proj.weight.zero_()
    result = to_semi_structured(nn.Sequential(attention), dry_run=True)
    assert "inside nn.MultiheadAttention" in result.skipped["0.out_proj"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cpu_model_is_refused_with_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"needs the model on a CUDA GPU .*weights are on \['cpu'\]"):
        to_semi_structured(two_four_model())


def test_float32_two_four_layers_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"needs float16 or bfloat16 weights.*'0': 'float32'.*model.to\(torch.bfloat16\)"
    ):
        to_semi_structured(two_four_model(torch.float32))


def test_nothing_to_convert_and_bad_arguments_are_refused() -> None:
    dense = nn.Sequential(nn.Linear(64, 64)).half()
    with pytest.raises(ValueError, match="no Linear layer can be converted"):
        to_semi_structured(dense)
    with pytest.raises(ValueError, match=r"backend='fast' is not one of"):
        to_semi_structured(dense, backend="fast")
    with pytest.raises(ValueError, match="dry_run=1 must be True or False"):
        to_semi_structured(dense, dry_run=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model=int must be a torch\.nn\.Module"):
        to_semi_structured(3)  # type: ignore[arg-type]


@pytest.mark.skipif(not CUDA_8, reason="needs a CUDA GPU with compute capability >= 8.0")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conversion_on_gpu_keeps_outputs(dtype: torch.dtype) -> None:
    model = two_four_model(dtype).cuda().eval()
    result = to_semi_structured(model)
    assert result.converted == ["0", "2"] and result.model is not model
    assert isinstance(result.model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    x = torch.randn(64, 128, device="cuda", dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or CUDA_8, reason="needs a CUDA GPU older than 8.0")
def test_old_gpu_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"need 8\.0 or newer"):
        to_semi_structured(two_four_model(torch.float16).cuda())
