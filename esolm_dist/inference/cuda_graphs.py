"""CUDA graphs of cached sampling steps.

A batch-1 step of a small model launches about a hundred tiny kernels, so on a GPU it is bound
by launches, not by the kernels. With a :class:`~esolm_dist.inference.kv_cache.StaticKVCache`
every step of one chunk shape launches the same kernels on the same buffers: ``StepGraphs``
captures each shape once and replays it.

Per shape (``key``): the first step runs eagerly on the capture stream (the warm-up: cuBLAS
creates its handles and workspaces per stream, which must not happen during a capture); the
second is captured (nothing runs during a capture) and then replayed; later ones copy their
inputs into the captured input buffers and replay. A replay returns the captured output buffer,
which the next replay of that shape overwrites: read it before the next step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class StepGraphs:
    """One CUDA graph per step shape; a step is ``step(*inputs) -> tensor`` on CUDA tensors."""

    def __init__(self, device: torch.device):
        self._stream = torch.cuda.Stream(device)
        self._warmed_up: set[Hashable] = set()
        self._graphs: dict[Hashable, _CapturedStep] = {}

    @property
    def num_captured(self) -> int:
        return len(self._graphs)

    def __call__(self, key: Hashable, step: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        captured = self._graphs.get(key)
        if captured is None:
            if key not in self._warmed_up:
                self._warmed_up.add(key)
                return self._warm_up(step, inputs)
            captured = self._graphs[key] = _CapturedStep(step, inputs, self._stream)
        return captured(*inputs)

    def _warm_up(self, step, inputs) -> torch.Tensor:
        current = torch.cuda.current_stream()
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            output = step(*inputs)
        current.wait_stream(self._stream)
        output.record_stream(current)  # read on the current stream: not to be reused before that
        return output


class _CapturedStep:
    def __init__(self, step: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], stream):
        self.inputs = tuple(value.clone() for value in inputs)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.output = step(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buffer, value in zip(self.inputs, inputs, strict=True):
            buffer.copy_(value)
        self.graph.replay()
        return self.output
