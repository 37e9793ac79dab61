"""CUDA graphs: device time of a replayed graph, and one training-step recipe that works with the layer.

**Timing.** :func:`graph_time` captures a callable once into a ``torch.cuda.CUDAGraph`` and times ``n``
replays between two CUDA events: every kernel of the call runs back to back with no host work in between, so the
figure is the GPU's time alone (launch overhead, Python, autograd bookkeeping all excluded).
:func:`cuda_event_timer` is a clock for pytest-benchmark's ``timer`` option that reads device time.

**Training step.** :class:`GraphedTrainStep` is PyTorch's whole-network capture recipe (static inputs, warm-up on
a side stream, capture of forward + backward + optimizer step, then ``copy_`` new data into the static inputs
and ``replay``), written for a model with routed layers:

    step = GraphedTrainStep(model, opt, loss_fn, example_batch)      # batch: a dict of tensors incl. "routes"
    for batch in data:
        loss = step(batch)                                           # copies into the static tensors, replays

What it takes from the layer (and what the layer guarantees):

- routes are static too: ``set_routes(model, static_routes)`` once, before the capture; each batch's routes are
  copied into that tensor, so every routed layer reads the new routes at replay (no ``set_routes`` inside);
- no host synchronisation in a layer call: routes set by ``set_routes`` are not re-checked per call; the
  PyTorch path's non-finite isolation on a GPU is sync-free (``sanitize``); the Triton path launches kernels only.
  Route values are checked by ``__call__`` on the host (set_routes' check) before the copy;
- the optimizer must be capturable (``torch.optim.AdamW(..., capturable=True)``);
- shapes are fixed: pad batches to one shape (a new shape needs a new capture);
- the warm-up runs every path first (Triton autotuning, the layer's cached constants), so nothing is
  compiled, tuned or cached for the first time inside the capture.

``capture=False`` runs the very same step eagerly (no graph): it is how the CPU tests check the recipe's
bookkeeping (static copies, routes, loss, optimizer) against a plain loop; ``torch.compile(model,
mode="reduce-overhead")`` is the other route to CUDA graphs (it captures the compiled graph; the layer's custom
op has no graph breaks) and needs no changes to the model either.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["graph_time", "cuda_event_timer", "GraphedTrainStep", "check_route_values"]


def graph_time(fn: Callable[[], object], n: int = 20, *, warmup: int = 3, repeats: int = 1) -> list[float]:
    """Seconds per call of ``fn`` replayed from a CUDA graph: ``repeats`` samples, each ``n`` replays between two
    CUDA events. ``fn`` is run ``warmup`` times on a side stream first, then captured once."""
    if not torch.cuda.is_available():
        raise RuntimeError("graph_time: needs a CUDA device (torch.cuda.is_available() is False)")
    graph = _capture(fn, warmup)
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / n)
    return out


def _capture(fn, warmup):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


class cuda_event_timer:
    """A clock in seconds of device time, for ``@pytest.mark.benchmark(timer=cuda_event_timer())``: each call
    records a CUDA event, waits for it and returns its time since the first event. Two readings around a call
    give the GPU time between them (including any idle time the host leaves; replay a graph to exclude it)."""

    def __init__(self):
        self._origin = None

    def __call__(self) -> float:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        if self._origin is None:
            self._origin = ev
            return 0.0
        return self._origin.elapsed_time(ev) / 1e3


def check_route_values(routes: torch.Tensor, num_adapters: int) -> None:
    """The check ``set_routes`` makes (values in [-1, E)), for new routes copied into a static routes tensor."""
    from routed_lora.layer import validate_routes

    validate_routes(routes, num_adapters)


class GraphedTrainStep:
    """One training step (forward, loss, backward, optimizer step, gradients zeroed) captured in a CUDA graph.

    ``loss_fn(model, batch) -> loss`` (a 0-d tensor); ``example`` is a dict of tensors with fixed shapes; its key
    ``"routes"`` (if any) becomes the routes of every routed layer (``set_routes`` on the static copy). The
    ``warmup`` steps train on the example (as in PyTorch's recipe: the capture needs every lazy initialisation
    done, optimizer state included), then the step is captured; nothing runs during the capture itself. Calling
    the step with a batch of the same shapes copies it into the static tensors, replays, and returns the loss
    (the static loss tensor: read or clone it before the next call). ``capture=None`` captures on CUDA and runs
    eagerly elsewhere; ``capture=False`` always runs eagerly (same code path minus the graph)."""

    def __init__(self, model, optimizer, loss_fn, example: dict, *, warmup: int = 3, capture: bool | None = None):
        import routed_lora as rl

        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.static = {k: v.detach().clone() for k, v in example.items()}
        self.num_adapters = None
        if "routes" in self.static:
            layers = [m for m in model.modules() if isinstance(m, rl.RoutedLoRALinear)]
            if not layers:
                raise ValueError("example: has 'routes' but the model has no RoutedLoRALinear")
            self.num_adapters = min(m.num_adapters for m in layers)
            rl.set_routes(model, self.static["routes"])  # checks the example's routes once
            # the layers' tensor (int32, on their device) becomes the static one: batches are copied into it
            self.static["routes"] = layers[0]._routes
            if any(m._routes is not layers[0]._routes for m in layers):
                raise ValueError("model: routed layers on several devices; one static routes tensor cannot serve them")
        device = next(model.parameters()).device
        self.capture = (device.type == "cuda") if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"capture: a CUDA graph needs the model on a CUDA device, got {device}")
        self.graph = None
        self.loss = None
        if self.capture:
            if optimizer.defaults.get("capturable") is False:
                raise ValueError("optimizer: CUDA graph capture needs capturable=True (e.g. AdamW(..., capturable=True))")
            self.graph = _capture(self._step, warmup)
        else:
            for _ in range(warmup):  # the same training steps on the example as before a capture
                self._step()

    def _step(self):
        self.optimizer.zero_grad(set_to_none=False)  # the gradients stay the same tensors, replay after replay
        loss = self.loss_fn(self.model, self.static)
        loss.backward()
        self.optimizer.step()
        self.loss = loss.detach()
        return self.loss

    def __call__(self, batch: dict) -> torch.Tensor:
        for k, v in batch.items():
            if k not in self.static:
                raise KeyError(f"batch: unexpected key {k!r}; the step was built for {sorted(self.static)}")
            st = self.static[k]
            if tuple(v.shape) != tuple(st.shape):
                raise ValueError(f"batch[{k!r}]: expected shape {tuple(st.shape)} (the captured one), got "
                                 f"{tuple(v.shape)}; pad to one shape or build another step")
            if k == "routes":
                check_route_values(v, self.num_adapters)
            st.copy_(v)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.loss
