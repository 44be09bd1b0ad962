"""The constants every backend shares are defined once per language (csrc/common/constants.h for C++ and CUDA,
deqkern/core/constants.py for Python and Triton): the values the extensions were compiled with must be Python's."""
import pytest

import deqkern
from deqkern.core import constants

import kit


def compiled_modules():
    modules = [deqkern._C]
    if deqkern._extension.CUDA_EXTENSION_BUILT:
        modules.append(deqkern._C_cuda)
    return modules


@pytest.mark.parametrize("module", compiled_modules(), ids=lambda m: m.__name__)
def test_compiled_constants_match_python(module):
    compiled = module.constants()
    assert compiled == {
        "RESIDUAL_EPS": constants.RESIDUAL_EPS,
        "ANDERSON_MAX_HISTORY": constants.ANDERSON_MAX_HISTORY,
        "ANDERSON_DEFAULT_LAM": constants.ANDERSON_DEFAULT_LAM,
    }


def test_the_public_defaults_are_the_constants():
    import inspect

    for fn in (deqkern.fixed_point_dense, deqkern.solve):
        params = inspect.signature(fn).parameters
        assert params["lam"].default == constants.ANDERSON_DEFAULT_LAM
        assert params["m"].default == constants.ANDERSON_DEFAULT_M


def test_the_history_cap_is_enforced_everywhere(backend):
    """m = ANDERSON_MAX_HISTORY is accepted and one more is refused, by the dense solve and by deqkern.solve."""
    import torch

    W, c, _ = kit.dense_problem(2, 4, device=kit.device_of(backend))
    cap = constants.ANDERSON_MAX_HISTORY
    deqkern.fixed_point_dense(W, c, method="anderson", m=cap, backend=backend)
    deqkern.solve(lambda z: torch.tanh(z @ W.T + c), torch.zeros_like(c), m=cap, backend=backend)
    for call in (lambda: deqkern.fixed_point_dense(W, c, method="anderson", m=cap + 1, backend=backend),
                 lambda: deqkern.solve(lambda z: z, torch.zeros_like(c), m=cap + 1, backend=backend)):
        with pytest.raises(ValueError, match="m \\(the Anderson history length\\)"):
            call()
