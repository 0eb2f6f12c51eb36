"""rewrite(gm, plan): the plan made real in the graph, a pure transformation.

- **Recompute.** A recomputed storage's nodes are copied just before its
  first backward reader, and every backward read of its activations is
  pointed at the copies, so the originals die at their last forward use.
  Copies inserted at the same node are shared (an intermediate two
  recomputes need is computed once). Copies follow passes/replay.py: an
  in-place op runs out of place, a training batch norm runs without
  running statistics (its output uses the batch's, so the bits are the
  same, and the real ones are updated once), ``sep`` is a plain alias.
- **Swap.** After the last forward access the storage is copied to the
  host (``swap_out``), the device copy is released where the plan expects
  the copy to have ended (``swap_free_at``), the copy back starts at
  ``prefetch_at`` (``swap_in``), and the compute stream waits for it just
  before the first backward reader, which reads views rebuilt on the new
  storage (copy_streams.py holds the streams, events and the pinned slab).

The rewritten graph frees every value at its last use (fx's generated
code), as the planner assumes. New nodes carry fake values, so the passes
can analyse the rewritten graph as they did the original."""

import contextlib
from collections import defaultdict

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._guards import detect_fake_mode

from passes.boundary import find_boundary
from passes.kinds import reads_in_backward
from passes.replay import Replay, replay_args, replay_op, replay_rule
from passes.storage import map_storages
from planner.problem import graph_fingerprint

from ..assemble import target_name
from ..errors import MutwoError
from .copy_streams import SWAP_MODULE, CopyStreams, storage_view
from .split import TAG

REPLAY_OF = "mutwo_replay_of"  # node.meta key: the original node a recompute copy replays


class RewriteError(MutwoError):
    """A plan could not be applied to a graph."""


def rewrite(gm: fx.GraphModule, plan) -> fx.GraphModule:
    """A new GraphModule that runs ``gm`` under ``plan`` (a planner.Plan);
    ``gm`` is left as it was. Raises RewriteError when the plan was made
    for another graph or names nodes this graph lacks."""
    fingerprint = graph_fingerprint([{"name": n.name, "target": target_name(n)} for n in gm.graph.nodes])
    if fingerprint != plan.graph_fingerprint:
        raise RewriteError(
            f"this plan was made for another graph (fingerprint {plan.graph_fingerprint}, this graph's is "
            f"{fingerprint}): plan again from a report of this step (profile_train_step, then plan_memory).")
    graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copied))
    graph._codegen = gm.graph._codegen  # the pytree in/out structure the step is called with
    root = fx.GraphModule(gm, graph)
    _Rewriter(root, plan).apply()
    graph.lint()
    root.recompile()
    return root


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, plan):
        self.gm, self.graph, self.plan = gm, gm.graph, plan
        self.nodes = tuple(self.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.rank = {n: i for i, n in enumerate(self.nodes)}
        self.boundary = find_boundary(self.nodes)
        self.storages = map_storages(self.nodes)
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in self.nodes if "val" in n.meta])
        self.replaced_storages: set[int] = set()  # of the values whose backward reads now read others
        self.replacements: set[fx.Node] = set()

    def apply(self) -> None:
        groups = self._groups()
        at_node: dict[fx.Node, list[tuple]] = defaultdict(list)
        swaps = []
        for (action, _), decisions in groups.items():
            acts = [self._node(d.activation) for d in decisions]
            first_reader = min((u for a in acts for u in self._backward_readers(a)), key=self.rank.__getitem__)
            if action == "recompute":
                at_node[first_reader].append((acts, decisions[0].recompute_nodes))
            else:
                swaps.append((acts, decisions[0], first_reader))
        for reader, chains in at_node.items():
            self._recompute_before(reader, chains)
        if swaps:
            self._swap(swaps)
        self._revalue_views()

    def _groups(self) -> dict[tuple, list]:
        """The plan's dropped activations by storage: a storage goes whole."""
        groups = defaultdict(list)
        for decision in self.plan.decisions:
            if decision.action == "keep":
                continue
            node = self._node(decision.activation)
            keys = self.storages.refs.get(node)
            if not keys:
                raise RewriteError(f"the plan drops {node.name}, which holds no tensor in this graph")
            groups[(decision.action, keys[0])].append(decision)
        return groups

    def _node(self, name: str) -> fx.Node:
        try:
            return self.by_name[name]
        except KeyError:
            raise RewriteError(f"the plan names node {name!r}, which this graph lacks: plan again from a "
                               "report of this graph") from None

    @contextlib.contextmanager
    def _placed(self, anchor: fx.Node, before: bool = True):
        """Insert next to ``anchor``; on a compile-path program the new nodes
        take its region's tag (split.py cuts the program by it)."""
        tag = anchor.meta.get(TAG)
        known = set(self.graph.nodes) if tag else None
        with self.graph.inserting_before(anchor if before else anchor.next):
            yield
        if tag:
            for node in self.graph.nodes:
                if node not in known:
                    node.meta[TAG] = tag

    def _backward_readers(self, node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if u in self.rank and reads_in_backward(u, self.boundary)]

    def _redirect(self, node: fx.Node, replacement: fx.Node) -> None:
        """Backward reads of ``node`` read ``replacement`` instead."""
        for user in self._backward_readers(node):
            user.replace_input_with(node, replacement)
        self.replaced_storages.update(_storage_keys(node.meta.get("val")))
        self.replacements.add(replacement)

    def _revalue_views(self) -> None:
        """A backward view of a redirected value (``detach``, ``t``) still
        carries a value on the original storage: make it again from its
        new input, so that the passes see the original freed."""
        changed = set(self.replacements)
        for node in self.graph.nodes:
            if node.op != "call_function" or node in changed or not any(a in changed for a in node.all_input_nodes):
                continue
            if _storage_keys(node.meta.get("val")) & self.replaced_storages:
                node.meta["val"] = self._value(node.target, node.args, node.kwargs, like=node)
                changed.add(node)

    # --- recompute -------------------------------------------------------------

    def _recompute_before(self, reader: fx.Node, chains: list[tuple]) -> None:
        """Copy the chains' nodes (their union, once each, in graph order)
        before ``reader`` and point the activations' backward reads at them."""
        order = sorted({self._node(name) for _, names in chains for name in names}, key=self.rank.__getitem__)
        replica: dict[fx.Node, fx.Node] = {}
        stale: set[fx.Node] = set()  # originals whose storage a replayed in-place op has since written
        with self._placed(reader):
            for node in order:
                replica[node] = self._replay(node, replica, stale)
        for acts, _ in chains:
            for act in acts:
                if act in stale:
                    raise RewriteError(f"{act.name} is a view its recompute cannot rebuild: an in-place op "
                                       "wrote its storage through another view; keep it")
                self._redirect(act, replica[act])

    def _replay(self, node: fx.Node, replica: dict, stale: set) -> fx.Node:
        rule, _ = replay_rule(node)

        def arg(value):
            if not isinstance(value, fx.Node):
                return value
            if value in stale:
                raise RewriteError(f"replaying {node.name} would read {value.name} after an in-place op "
                                   "replayed out of place wrote its storage: keep that activation")
            return replica.get(value, value)

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), arg)
        copy = self._new_node(replay_op(node), replay_args(node, tuple(args)), dict(kwargs), like=node)
        copy.meta.update({k: v for k, v in node.meta.items() if k != "val"}, **{REPLAY_OF: node.name})
        if rule is Replay.OUT_OF_PLACE:  # its result is what later reads of the written value see
            written = node.args[0]
            keys = set(self.storages.refs.get(written, ()))
            stale.update(n for n in replica if n is not written and keys & set(self.storages.refs.get(n, ())))
            replica[written] = copy
        return copy

    def _new_node(self, target, args, kwargs=None, like: fx.Node | None = None) -> fx.Node:
        """A call_function node with the value the passes read: ``target``
        run on its inputs' values (fake or meta tensors, as the capture left
        them), so it sits on fresh storages, not the original's; where that
        op has no such kernel, ``like``'s value remade on fresh storages."""
        node = self.graph.call_function(target, args, kwargs)
        node.meta["val"] = self._value(target, args, kwargs, like)
        return node

    def _value(self, target, args, kwargs, like: fx.Node | None):
        values = fx.node.map_arg((args, kwargs or {}), lambda n: n.meta.get("val"))
        try:
            with self.fake_mode or contextlib.nullcontext():
                return target(*values[0], **values[1])
        except Exception:  # (no fake or meta kernel: the geometry is all the passes need)
            if like is None:
                raise
            return _on_fresh_storages(like.meta["val"])

    # --- swap ------------------------------------------------------------------

    def _swap(self, swaps: list[tuple]) -> None:
        self.gm.add_submodule(SWAP_MODULE, CopyStreams([self.storages.nbytes[self.storages.refs[acts[0]][0]]
                                                        for acts, _, _ in swaps]))
        for index, (acts, decision, first_reader) in enumerate(swaps):
            self._swap_one(index, acts, decision, first_reader)

    def _swap_one(self, index: int, acts: list[fx.Node], decision, first_reader: fx.Node) -> None:
        last_fw = self._node(decision.swap_out_after)
        free_at = self._node(decision.swap_free_at or decision.prefetch_at)
        prefetch = self._node(decision.prefetch_at)
        host = next(iter(sorted(acts, key=self.rank.__getitem__)))
        with self._placed(last_fw, before=False):
            streams = self.graph.get_attr(SWAP_MODULE)
            out = self.graph.call_method("swap_out", (streams, index, host))
        with self._placed(free_at):
            freed = self.graph.call_method("free", (out,))  # (holds no tensor: the storage is not read later)
        with self._placed(prefetch):
            back = self.graph.call_method("swap_in", (streams, index, freed))
        with self._placed(first_reader):
            flat = self.graph.call_method("wait", (back,))
            for act in acts:
                self._redirect(act, self._view_on(flat, act))
        with self.fake_mode or contextlib.nullcontext():  # the values the passes read
            original = host.meta["val"]
            out.meta["val"] = torch.empty(0, dtype=torch.uint8, device=original.device).set_(
                original.untyped_storage())  # the device storage, held until freed
            back.meta["val"] = flat.meta["val"] = torch.empty(
                self.storages.nbytes[self.storages.refs[host][0]], dtype=torch.uint8, device=original.device)
            for view in list(flat.users):
                view.meta["val"] = storage_view(flat.meta["val"], *view.args[1:])

    def _view_on(self, flat: fx.Node, act: fx.Node) -> fx.Node:
        value = act.meta["val"]
        if not isinstance(value, torch.Tensor):
            raise RewriteError(f"{act.name} is not a tensor: only tensors can be swapped")
        return self.graph.call_function(storage_view, (flat, value.dtype, tuple(value.shape), tuple(value.stride()),
                                                       value.storage_offset()))



def _on_fresh_storages(value):
    """``value``'s tensors remade with the same geometry on new storages
    (one per storage of the original, shared by its views)."""
    storages = {}

    def remake(tensor):
        key = tensor.untyped_storage()._cdata
        if key not in storages:
            storages[key] = torch.empty(tensor.untyped_storage().nbytes(), dtype=torch.uint8, device=tensor.device)
        return storage_view(storages[key], tensor.dtype, tensor.shape, tensor.stride(), tensor.storage_offset())

    return pytree.tree_map_only(torch.Tensor, remake, value)


def _storage_keys(value) -> set[int]:
    return {t.untyped_storage()._cdata for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)}
