"""Keeping ``self.training`` live in a traced (FX) model.

``torch.fx`` runs ``forward`` once with proxies: a Python bool such as ``self.training`` is read
at trace time and written into the graph as a constant. ``prepare_qat_fx`` traces a train-mode
model, so ``F.dropout(x, p, training=self.training)`` (timm heads with ``drop_rate > 0``) keeps
dropping after ``model.eval()``, and timm's ``BatchNormAct2d`` (``F.batch_norm(..., training=
self.training or ...)``) keeps normalizing with batch statistics: two evaluations of the same
images differ. Modules that tracing keeps as leaves (``nn.Dropout``, ``nn.BatchNorm2d``) are not
affected: their own ``forward`` reads the flag at run time.

:func:`make_training_flags_live` rewrites a traced graph: where a call of a function in
:data:`TRAINING_FLAG_ARGS` (the dropout family, ``batch_norm``, ``rrelu``) got a constant bool for
its training argument (and torchvision's fx-wrapped ``stochastic_depth``), the constant becomes a
read of a module's live ``training`` attribute: for
``batch_norm``, the module that holds its running statistics (so that freezing that module with
``.eval()`` freezes it); otherwise the traced model's own flag (``model.train()/.eval()``). A model
traced from a train-mode copy then computes, in eval mode, what a model traced from an eval-mode
copy computes.

Other branches on ``self.training`` (``if self.training: ...``) cannot be made live: the branch
not taken is not in the graph. :func:`check_training_branches` traces the model in both modes
and refuses (``ValueError`` naming the first differing operation) a model whose two graphs differ
beyond those calls and the ``num_batches_tracked`` counter update of a traced batch norm.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as nn_functional
from torch.fx import GraphModule, Node, Tracer

__all__ = ["TRAINING_FLAG_ARGS", "make_training_flags_live", "check_training_branches"]


def _position(function: Callable, name: str) -> int:
    return list(inspect.signature(function).parameters).index(name)


#: function -> (position, keyword) of its training flag argument
TRAINING_FLAG_ARGS: Dict[Callable, Tuple[int, str]] = {
    function: (_position(function, "training"), "training")
    for function in (nn_functional.dropout, nn_functional.dropout1d, nn_functional.dropout2d,
                     nn_functional.dropout3d, nn_functional.alpha_dropout, nn_functional.feature_alpha_dropout,
                     nn_functional.batch_norm, nn_functional.rrelu)
}
TRAINING_FLAG_ARGS.update({torch.dropout: (2, "train"), torch.alpha_dropout: (2, "train"),
                           torch.feature_alpha_dropout: (2, "train"), torch.batch_norm: (5, "training")})
try:  # torchvision's StochasticDepth calls this fx-wrapped function with self.training
    from torchvision.ops import stochastic_depth as _stochastic_depth
except ImportError:  # pragma: no cover - torchvision is optional
    pass
else:
    TRAINING_FLAG_ARGS[_stochastic_depth] = (_position(_stochastic_depth, "training"), "training")


def _flag_of(node: Node) -> Tuple[Optional[object], Optional[Tuple[str, object]]]:
    """``(value, where)`` of ``node``'s training argument (``where``: ``("arg", i)`` or ``("kwarg", name)``)."""
    position, keyword = TRAINING_FLAG_ARGS[node.target]
    if len(node.args) > position:
        return node.args[position], ("arg", position)
    if keyword in node.kwargs:
        return node.kwargs[keyword], ("kwarg", keyword)
    return None, None


def _owner_path(model: GraphModule, node: Node) -> str:
    """The module whose ``training`` flag the call of ``node`` should read: for a batch norm,
    the holder of its running mean (a ``get_attr``), else the model itself (``""``)."""
    if node.target in (nn_functional.batch_norm, torch.batch_norm) and len(node.args) > 1:
        running_mean = node.args[1]
        if isinstance(running_mean, Node) and running_mean.op == "get_attr":
            owner = str(running_mean.target).rpartition(".")[0]
            try:
                model.get_submodule(owner)
                return owner
            except AttributeError:
                pass
    return ""


def make_training_flags_live(model: GraphModule) -> List[str]:
    """Replace the constant training flags of the calls in :data:`TRAINING_FLAG_ARGS` by reads of
    a live ``training`` attribute (module docstring); returns the names of the rewritten nodes.
    In place."""
    rewritten = []
    for node in list(model.graph.nodes):
        if node.op != "call_function" or node.target not in TRAINING_FLAG_ARGS:
            continue
        value, where = _flag_of(node)
        if not isinstance(value, bool):
            continue
        owner = _owner_path(model, node)
        with model.graph.inserting_before(node), warnings.catch_warnings():
            # a plain attribute, not a parameter/buffer/module: FX warns, and reads it all the same
            warnings.simplefilter("ignore", UserWarning)
            flag = model.graph.get_attr(f"{owner}.training" if owner else "training")
        if where[0] == "arg":
            args = list(node.args)
            args[where[1]] = flag
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, where[1]: flag}
        rewritten.append(node.name)
    if rewritten:
        model.recompile()
    return rewritten


def _signature(graph: torch.fx.Graph) -> List[Tuple[str, str, tuple]]:
    """The graph's operations (with their bool arguments: a flag such as ``self.training`` passed
    to a wrapped function shows there), without the flags that are made live and without
    batch-norm counter updates (``num_batches_tracked.add_(1)``: a side effect only)."""
    ops = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_function" and node.target in TRAINING_FLAG_ARGS:
            ops.append((node.op, str(node.target), ()))  # present in both modes; its flag is made live
            continue
        if node.op == "call_method" and node.target in ("add_", "add") and node.args and \
                isinstance(node.args[0], Node) and str(node.args[0].target).endswith("num_batches_tracked"):
            continue
        flags = tuple(value for value in (*node.args, *node.kwargs.values()) if isinstance(value, bool))
        ops.append((node.op, str(node.target), flags))
    return ops


def check_training_branches(model: torch.nn.Module, tracer_class: type = Tracer) -> None:
    """``ValueError`` if ``model``'s traced graph in train mode and in eval mode differ beyond the
    calls whose flag :func:`make_training_flags_live` makes live (module docstring). A model that
    ``tracer_class`` cannot trace passes (the prepare that follows reports it). Training flags
    are restored."""
    modes = {module: module.training for module in model.modules()}
    graphs = {}
    try:
        for mode in (True, False):
            model.train(mode)
            try:
                graphs[mode] = tracer_class().trace(model)
            except Exception:  # noqa: BLE001 - not traceable: torch.ao's prepare will say why
                return
    finally:
        for module, mode in modes.items():
            module.training = mode
    train, evaluation = _signature(graphs[True]), _signature(graphs[False])
    if train == evaluation:
        return
    index = next((i for i, (a, b) in enumerate(zip(train, evaluation)) if a != b), min(len(train), len(evaluation)))
    def describe(ops, i):
        if i >= len(ops):
            return "(nothing)"
        return ops[i][1] + (f" with flags {ops[i][2]}" if ops[i][2] else "")

    in_train, in_eval = describe(train, index), describe(evaluation, index)
    raise ValueError(
        f"{type(model).__name__}'s forward takes a different path in train and eval mode (operation {index}: "
        f"{in_train} in train mode, {in_eval} in eval mode): tracing freezes the branch of the mode it traced "
        "(train mode for QAT), so the prepared model would keep it after .eval(). Make that branch a module "
        "(e.g. nn.Dropout instead of `if self.training`), or prepare two models, one per mode.")
