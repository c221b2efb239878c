"""Where the network runs: eager torch (training, CUDA) or ONNX Runtime (CPU inference).

Both take (N, S, S, 3) uint8 pixels and return (N, D) float32 L2-normalised vectors. The ONNX
graph is the same network with the input normalisation folded in, exported once per weights
and settings and cached on disk, so every replica of a node after the first loads it in a
fraction of a second."""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from configs.schema import ModelConfig
from embedding.model import build_model, to_input

LOG = logging.getLogger(__name__)

# Part of every cache key: a change to how the graph is exported must not reuse an old file.
EXPORT_SETTINGS = {"exporter": "torchscript", "opset": 17, "input": "uint8 NHWC", "dynamic": "batch"}


def pick_device(requested: str) -> torch.device:
    """Resolve `model.device`: auto means CUDA when visible, else CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is visible")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def default_threads() -> int:
    """Threads for one model: Ray sets OMP_NUM_THREADS to an actor's CPU reservation (rounded up
    to 1); outside Ray, every core this process may run on."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))


class TorchRunner:
    """Eager torch on a device; fp16 on CUDA when `model.fp16_on_cuda`."""

    name = "torch"

    def __init__(self, net: nn.Module, cfg: ModelConfig, device: torch.device, threads: Optional[int] = None):
        self.cfg, self.device = cfg, device
        self.half = device.type == "cuda" and cfg.fp16_on_cuda
        net = net.eval().to(device)
        self.net = net.half() if self.half else net
        if device.type == "cpu" and threads:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        x = to_input(torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device), self.cfg.mean, self.cfg.std)
        return self.net(x.half() if self.half else x).float().cpu().numpy()


class _FromPixels(nn.Module):
    """The network behind its input normalisation: the exported graph takes uint8 NHWC pixels."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std)


def cache_key(net: nn.Module, cfg: ModelConfig) -> str:
    """Digest of the weights, the network's shape settings and the exporter: equal keys, equal graphs."""
    h = hashlib.sha256(repr((EXPORT_SETTINGS, torch.__version__, cfg.name, cfg.pooling, cfg.image_size,
                             tuple(cfg.mean), tuple(cfg.std))).encode())
    for name, tensor in net.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def cache_dir(cfg: ModelConfig) -> Path:
    """`model.onnx_cache`, else $XDG_CACHE_HOME/imsearch/onnx (~/.cache when unset)."""
    if cfg.onnx_cache:
        return Path(cfg.onnx_cache).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imsearch" / "onnx"


def export_onnx(net: nn.Module, cfg: ModelConfig, path: Path) -> None:
    """Write the network (normalisation included) as an ONNX graph with a dynamic batch axis. The
    file appears whole or not at all, so replicas exporting side by side never read a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    sample = torch.zeros(2, cfg.image_size, cfg.image_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and shape-inference notes
        warnings.simplefilter("ignore")
        torch.onnx.export(_FromPixels(net.eval().cpu(), cfg.mean, cfg.std), (sample,), str(tmp), dynamo=False,
                          opset_version=EXPORT_SETTINGS["opset"], input_names=["pixels"], output_names=["vectors"],
                          dynamic_axes={"pixels": {0: "n"}, "vectors": {0: "n"}})
    os.replace(tmp, path)


class OnnxRunner:
    """ONNX Runtime's CPU execution provider over the cached export of the network."""

    name = "onnx"

    def __init__(self, net: nn.Module, cfg: ModelConfig, threads: Optional[int] = None):
        import onnxruntime as ort

        self.path = cache_dir(cfg) / f"{cfg.name}-{cache_key(net, cfg)}.onnx"
        if not self.path.is_file():
            LOG.info("exporting %s to ONNX at %s", cfg.name, self.path)
            export_onnx(net, cfg, self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initialisers are not a user's concern
        # Idle threads must sleep, not spin: on a small host they would take the CPU from the
        # shards and the HTTP front between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": np.ascontiguousarray(pixels, np.uint8)})[0]


def open_runner(cfg: ModelConfig, threads: Optional[int] = None) -> TorchRunner | OnnxRunner:
    """The runtime `model.runtime` names; auto: ONNX Runtime on CPU, torch on CUDA."""
    device = pick_device(cfg.device)
    runtime = cfg.runtime if cfg.runtime != "auto" else ("onnx" if device.type == "cpu" else "torch")
    if runtime == "onnx" and device.type != "cpu":
        raise RuntimeError("model.runtime 'onnx' runs on CPU only; set model.device: cpu or model.runtime: torch")
    net = build_model(cfg)
    if runtime == "onnx":
        return OnnxRunner(net, cfg, threads)
    return TorchRunner(net, cfg, device, threads)
