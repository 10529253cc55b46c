"""Shared test fixtures. Tests run on CPU with one thread (the CPU may be shared) and never touch the network."""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                     help="where the tests that take the `device` fixture run: `cuda` runs those exactness checks "
                          "on a GPU (benchmarks/gpu_session.sh does, first)")


@pytest.fixture(scope="session")
def device(request):
    """The device of the exactness checks that also matter on a GPU (the CUDA random state in the gradient-cache
    replay and in checkpoints, tensors moved to the device). Most build their encoder in fp32 (model.dtype, which
    CPUs always use) and compare at fp32 tolerances, so TF32 convolutions are turned off on a GPU; those of the GPU's
    bf16 kernels run in bf16 there (on CPU, bf16 patched in) and compare at bf16 tolerances."""
    name = request.config.getoption("--device")
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("--device cuda: this machine has no CUDA GPU")
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device(name)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """Directory of the tiny random Qwen3-VL (fake_backbones.py make-tiny), built once per test session."""
    from fake_backbones import make_tiny_backbone
    out = tmp_path_factory.mktemp("tiny-qwen3vl")
    make_tiny_backbone(str(out), seed=0)
    return str(out)


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory):
    """A small U-FIRE-mini (prepare_data.py, 1/10 of the default size), built once per test session; read-only:
    a test that damages files copies it first."""
    from ufire_mini import generate
    return generate(str(tmp_path_factory.mktemp("ufire") / "ufire-mini"), seed=0, scale=0.1, image_size=64,
                    progress=False)
