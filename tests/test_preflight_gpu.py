"""The preflight's GPU build check (hw3/pipeline/preflight.py: gpu_build_finding, check_gpu_build): a GPU's compute
capability against the kinds the installed torch was built for, with faked capabilities and arch lists (no GPU is
needed). The arch lists are those torch 1.12.1's builds report: the PyPI wheel (CUDA 10.2) and PyTorch's CUDA 11.3 and
11.6 builds."""
import pytest
import torch

from hw3.pipeline import preflight
from hw3.pipeline.preflight import FAIL, OK, WARN, gpu_build_finding, parse_arch

CU102 = ["sm_37", "sm_50", "sm_60", "sm_70"]                        # pip install torch==1.12.1 (PyPI)
CU113 = ["sm_37", "sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86"]  # +cu113 and +cu116 list the same
CU113_COMMAND = ("pip install torch==1.12.1+cu113 torchvision==0.13.1+cu113 --extra-index-url "
                 "https://download.pytorch.org/whl/cu113")


@pytest.mark.parametrize("entry, expected", [
    ("sm_86", ("sm", (8, 6))), ("compute_37", ("compute", (3, 7))), ("sm_90a", ("sm", (9, 0))),
    ("sm_120", ("sm", (12, 0))), ("gfx90a", None), ("sm_", None), ("sm_x7", None),
])
def test_arch_entries_parse(entry, expected):
    assert parse_arch(entry) == expected


def test_a_2080_ti_runs_the_pypi_wheel():
    """sm_75 has no kernels of its own in the CUDA 10.2 wheel; it runs the sm_70 ones (same major version)."""
    finding = gpu_build_finding((7, 5), CU102, "NVIDIA GeForce RTX 2080 Ti", "torch 1.12.1+cu102")
    assert finding.level == OK
    assert finding.text == ("NVIDIA GeForce RTX 2080 Ti (sm_75): torch 1.12.1+cu102 has kernels for it "
                            "(its sm_70 kernels run on sm_75)")


def test_an_ampere_gpu_on_the_pypi_wheel_fails_naming_the_cu113_build():
    finding = gpu_build_finding((8, 6), CU102, "NVIDIA GeForce RTX 3090", "torch 1.12.1+cu102")
    assert finding.level == FAIL
    assert "has no kernels for it (it has sm_37 sm_50 sm_60 sm_70)" in finding.text
    assert CU113_COMMAND in finding.todo and "cu116" in finding.todo


@pytest.mark.parametrize("capability", [(8, 0), (8, 6)])
def test_an_ampere_gpu_runs_the_cu113_build(capability):
    finding = gpu_build_finding(capability, CU113)
    assert finding.level == OK and "(its" not in finding.text  # kernels of its own


def test_an_ada_gpu_runs_the_sm_86_kernels_of_the_cu113_build():
    finding = gpu_build_finding((8, 9), CU113)
    assert finding.level == OK and finding.text.endswith("(its sm_86 kernels run on sm_89)")


def test_hopper_has_no_torch_1_12_1_build():
    finding = gpu_build_finding((9, 0), CU113)
    assert finding.level == FAIL
    assert "no torch 1.12.1 build has sm_90 kernels" in finding.todo and "newer torch" in finding.todo
    assert "pip install" not in finding.todo


def test_kernels_of_a_newer_minor_version_do_not_run():
    """sm_86 kernels do not run on an sm_80 GPU (an A100)."""
    assert gpu_build_finding((8, 0), ["sm_70", "sm_86"]).level == FAIL


def test_ptx_of_an_older_kind_is_a_warning():
    finding = gpu_build_finding((9, 0), CU113 + ["compute_86"])
    assert finding.level == WARN and "only PTX (compute_86)" in finding.text
    assert gpu_build_finding((8, 0), ["sm_70", "compute_86"]).level == FAIL  # PTX only runs forward


def test_a_gpu_older_than_every_build_fails():
    finding = gpu_build_finding((3, 5), CU113)
    assert finding.level == FAIL and "no torch 1.12.1 build runs on sm_35" in finding.todo


def test_an_empty_arch_list_is_not_checked():
    assert gpu_build_finding((7, 5), []).level == WARN


def fake_gpus(monkeypatch, gpus, arch_list):
    """torch.cuda as seen with these (name, capability) GPUs and a torch built for arch_list."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: gpus[index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: gpus[index][1])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)


def test_the_check_reads_torch(monkeypatch):
    fake_gpus(monkeypatch, [("RTX 3090", (8, 6)), ("RTX 3090", (8, 6)), ("RTX 2080 Ti", (7, 5))], CU102)
    findings = preflight.check_gpu_build()
    assert [(f.level, f.text.split(":")[0]) for f in findings] == [(FAIL, "RTX 3090 (sm_86)"),
                                                                   (OK, "RTX 2080 Ti (sm_75)")]
    assert f"torch {torch.__version__} (CUDA {torch.version.cuda}) has no kernels" in findings[0].text
    assert "-m pip install torch==1.12.1+cu113" in findings[0].todo


def test_no_gpu_no_finding(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert preflight.check_gpu_build() == []
