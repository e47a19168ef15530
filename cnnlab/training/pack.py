"""A pack: N trials of one architecture trained as one stacked model, each member still a model of its own.

Every parameter (and buffer) of the N members lives in one stacked tensor of shape (N, ...). Each member's own
module keeps a parameter that is a view of its row, a leaf of its own, so that:

- the forward and backward run once for the pack (torch.func.vmap over functional_call): one set of kernel
  launches, where N separate trials launch N sets, and a small network's step is bound by launches on a GPU;
- each member's gradients are views of the stacked gradient's rows, with no copy;
- each member's optimizer, scheduler and EMA are the ones a trial alone builds (the optimizer registry, its
  step_kernel), stepping its own parameters in place, and so the stacked tensors;
- a member's BatchNorm statistics are its own rows of the stacked buffers, updated in place under vmap;
- a member's state_dict is the one a trial alone saves (cloned: a row alone, not the whole stack).

Members differ in numbers only: their initialisation (their own seed), optimizer values and schedule, label
smoothing. ``packable`` says why a model cannot be packed, in one line, and the trial then runs alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


def packable(models: Sequence[nn.Module], sample: torch.Tensor | None = None) -> str | None:
    """None when ``models`` can be stacked; else the reason, in words. ``sample``: one batch of the members' input
    (B, ...), run once through two stacked members to find what vmap cannot batch or a model's output that is not
    plain logits."""
    shapes = [[(n, tuple(t.shape), t.dtype) for n, t in (*m.named_parameters(), *m.named_buffers())] for m in models]
    if any(s != shapes[0] for s in shapes[1:]):
        return "the members' architectures differ (their parameters' names or shapes)"
    if getattr(models[0], "memorises", False):
        return "the model learns by remembering (k-NN), not by gradient steps"
    if sample is None or len(models) < 2:
        return None
    import copy

    probe = [copy.deepcopy(m).train() for m in models[:2]]  # copies: no statistics of the real members move
    devices = [sample.device] if sample.is_cuda else []
    try:  # and no random draw of theirs: dropout's draws here come from a forked generator
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            out = Pack(probe)(sample)
    except Exception as e:  # noqa: BLE001 - whatever vmap refuses is the reason, in its own first line
        return f"torch.func.vmap cannot batch the model: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
    if not isinstance(out, torch.Tensor):
        return f"the model returns {type(out).__name__} (auxiliary outputs), not logits alone"
    return None


class Pack(nn.Module):
    """``members``: N models of one architecture, each initialised as its trial alone initialises it. Their
    parameters and buffers become views of the pack's stacked tensors in place (``.data``), so a member's
    optimizer, built before or after, steps the stack; its state_dict stays its own (copied out on save)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        reason = packable(members)  # the shapes only: a pack shrinks to the members still training, down to one
        if reason is not None:
            raise ValueError(reason)
        self.members = list(members)  # not submodules: each is saved, loaded and stepped as a trial's own model
        params, buffers = stack_module_state(list(members))
        self.stacked_params = {n: p.detach().requires_grad_(members[0].get_parameter(n).requires_grad)
                               for n, p in params.items()}
        self.stacked_buffers = {n: b.detach() for n, b in buffers.items()}
        for i, member in enumerate(members):
            for name, stacked in self.stacked_params.items():
                member.get_parameter(name).data = stacked.detach()[i]
            for name, stacked in self.stacked_buffers.items():
                member.get_buffer(name).data = stacked[i]
            if not getattr(member, "_pack_copies_state", False):  # its state_dict: its rows, not the stack
                member.register_state_dict_post_hook(_own_rows)
                member._pack_copies_state = True
        # The stateless template functional_call runs: member 0's structure, its tensors replaced each call.
        self.template = members[0]
        self._calls: dict[tuple, list] = {}  # the template's dropout calls, by input shape (_dropout_calls)

    def __len__(self) -> int:
        return len(self.members)

    def train(self, mode: bool = True) -> Pack:
        for m in self.members:
            m.train(mode)
        return self

    def forward(self, x: torch.Tensor, per_member: bool = False,
                generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Logits (N, B, C): every member on the same batch ``x`` (B, ...), or with ``per_member`` each on its own
        row of ``x`` (N, B, ...). ``generators``: each member's own stream of random draws (on the CPU), from which
        its dropout masks come in the order its trial alone draws them from the global generator; without them,
        vmap draws every member's masks at once, different but not the trial alone's."""
        masked = generators is not None and self.template.training
        calls = self._dropout_calls(x[0] if per_member else x) if masked else []
        modules = [module for module, _, _ in calls]

        def one(params, buffers, images, noises):
            with _masked_dropouts(list(zip(modules, noises))):
                return functional_call(self.template, (params, buffers), (images,))

        noises = [torch.stack([torch.empty(shape, dtype=dtype, device=x.device).bernoulli_(1 - module.p, generator=g)
                               for g in generators]) for module, shape, dtype in calls]
        in_x = 0 if per_member else None
        return vmap(one, in_dims=(0, 0, in_x, 0), randomness="different")(
            self.stacked_params, self.stacked_buffers, x, noises)

    def _dropout_calls(self, sample: torch.Tensor) -> list[tuple[nn.Module, tuple, torch.dtype]]:
        """The template's nn.Dropout calls for a batch shaped like ``sample``, in the order a forward makes them
        (a module called twice is listed twice), each with its input's shape and dtype: found once per shape by a
        forward of a copy (its statistics and the random state untouched)."""
        key = (tuple(sample.shape), torch.is_autocast_enabled(sample.device.type))
        if key not in self._calls:
            import copy

            probe = copy.deepcopy(self.template).train()
            originals = dict(zip(probe.modules(), self.template.modules()))
            seen: list[tuple[nn.Module, tuple, torch.dtype]] = []
            hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((originals[m], tuple(args[0].shape),
                                                                               args[0].dtype)))
                     for m in probe.modules() if type(m) is nn.Dropout and 0 < m.p < 1]
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[sample.device] if sample.is_cuda else []):
                    probe(sample)
            finally:
                for hook in hooks:
                    hook.remove()
            self._calls[key] = seen
        return self._calls[key]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.stacked_params.values():
            p.grad = None
        for m in self.members:
            m.zero_grad(set_to_none=True)

    def share_grads(self) -> None:
        """After backward: each member's parameter's gradient is its row of the stacked gradient (a view)."""
        for name, stacked in self.stacked_params.items():
            if stacked.grad is None:
                continue
            for i, member in enumerate(self.members):
                member.get_parameter(name).grad = stacked.grad[i]

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s state_dict, as its trial alone saves it."""
        return self.members[i].state_dict()


def _own_rows(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    """A member's state_dict holds views of the pack's stack: torch.save would write the whole stack for each.
    Each becomes a copy of its own rows."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() > value.numel() * value.element_size():
            state[key] = value.detach().clone()


def compact(module: nn.Module) -> None:
    """Give every tensor of ``module`` (a deep copy of a member, e.g. its EMA) storage of its own: copying a view
    of the stack copied the whole stack."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
            tensor.data = tensor.data.clone()


@contextlib.contextmanager
def _masked_dropouts(noises: list[tuple[nn.Module, torch.Tensor]]):
    """Inside the vmapped forward: each nn.Dropout call takes the next of ``noises`` (this member's row) and does
    what F.dropout does with the noise it draws: x * noise / (1 - p)."""
    if not noises:
        yield
        return
    queue = iter(noises)
    modules = {id(m): m for m, _ in noises}

    def masked(x, module):
        called, noise = next(queue)
        if called is not module:  # the model's forward took another path than the probe's: no mask is right
            raise RuntimeError("a dropout of the packed model was called out of the order its probe saw")
        return x * noise.div(1 - module.p)

    for module in modules.values():
        module.forward = lambda x, module=module: masked(x, module)
    try:
        yield
    finally:
        for module in modules.values():
            del module.forward


def member_losses(logits: torch.Tensor, y: torch.Tensor, label_smoothing: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each member (N,), with each member's own label smoothing (N,): what
    nn.CrossEntropyLoss(label_smoothing=e) gives for one member, (1 - e) * NLL + e * mean over classes of -log p."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if y.is_floating_point():  # soft targets (mixup, cutmix): (N, B, C) or (B, C)
        nll = -(y.expand(logp.shape) * logp).sum(-1).mean(-1)
    else:
        target = y if y.dim() == logits.dim() - 1 else y.expand(logits.shape[:-1])
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).mean(-1)
    uniform = -logp.mean(-1).mean(-1)
    return (1 - label_smoothing) * nll + label_smoothing * uniform


# What the trials of a pack may differ in: what each member builds for itself (its seed, its optimizer, schedule
# and initialisation, its augmentation's strengths) and its own loss smoothing and stopping rules. Everything else
# (the model, the data and its batches, the epochs, the device and precision) is the pack's, shared.
PACKABLE_KEYS = {"seed", "optimizer", "scheduler", "init", "trainer.label_smoothing", "trainer.ema_decay",
                 "trainer.grad_clip", "trainer.grad_clip_mode", "trainer.early_stopping_patience",
                 "trainer.divergence_factor"}
PACKABLE_SECTIONS = ("optimizer.", "scheduler.", "init.", "augment.ops.")


# pack=auto: at most this many members (past it a small network's step is no longer bound by launches), in this share
# of the GPU's free memory (the rest: the allocator's fragmentation, and what a pack adds over N members alone).
PACK_MOST = 32
PACK_HEADROOM = 0.8


def pack_for_memory(free_bytes: int, total_bytes: int, member_bytes: int, workers: int = 1,
                    most: int = PACK_MOST) -> int:
    """pack=auto's size: as many members as fit in PACK_HEADROOM of a GPU's memory at ``member_bytes`` each (one
    member's measured peak), 1 to ``most``. The memory is what is free now, and no more than this worker's share
    of the GPU's ``total_bytes`` when ``workers`` train on it (the others may not have started yet)."""
    share = PACK_HEADROOM * min(free_bytes, total_bytes / max(workers, 1))
    return max(1, min(most, int(share // max(member_bytes, 1))))


def packable_key(key: str) -> bool:
    key = key.lstrip("+~")
    return key in PACKABLE_KEYS or key.startswith(PACKABLE_SECTIONS)


class PackedTraining:
    """N Trainers in lock-step, each with its own loaders (its own data order and augmentation draws), one stacked
    forward and backward a batch, then each member's own update, sums, guard, logs and checkpoints (Trainer's own
    methods). A member that stops (diverged, pruned, early-stopped, its last epoch) leaves the pack, which shrinks
    to the members still training."""

    def __init__(self, trainers: Sequence, loaders: Sequence[tuple], batches: int,
                 rng_states: Sequence[torch.Tensor] | None = None):
        self.trainers, self.loaders, self.batches = list(trainers), list(loaders), batches
        first = self.trainers[0]
        self.device, self.autocast_dtype = first.device, first.autocast_dtype
        # Each member's own global random stream (CPU: what its dropout draws from alone), from where its run stood
        # when its loop would have begun; on a GPU, vmap draws the masks (CUDA's fused dropout draws differently).
        self.generators = None
        if rng_states is not None and self.device.type == "cpu":
            self.generators = [torch.Generator().set_state(state) for state in rng_states]

    def as_member(self, k: int) -> None:
        """The global random state is member k's while its Trainer may checkpoint it (capture_rng)."""
        if self.generators is not None:
            torch.set_rng_state(self.generators[k].get_state())

    def active(self) -> list[int]:
        from cnnlab.core.status import RunStatus

        return [k for k, t in enumerate(self.trainers)
                if t.status == RunStatus.RUNNING and t.epoch < t.settings.epochs]

    def fit(self) -> None:
        from cnnlab.core.errors import Preempted
        from cnnlab.core.status import RunStatus

        while members := self.active():
            for k in members:
                self.trainers[k].epoch += 1
            progress = {k: self.trainers[k].begin_epoch(self.loaders[k][0], self.batches) for k in members}
            starts = {p.start for p in progress.values()}
            if len(starts) != 1:
                raise RuntimeError(f"the pack's members stopped at different batches {sorted(starts)}; resume them apart")
            batches = {k: self.loaders[k][0].iterate(progress[k].start) for k in members}
            running = self.train_epoch(members, progress, batches, starts.pop())
            preempted = None
            for k in running:
                trainer, epoch = self.trainers[k], progress[k]
                train, train_time = epoch.sums.result(trainer.ranks), epoch.timer.stop()
                if trainer.diverged():
                    continue
                self.as_member(k)
                try:
                    trainer.end_epoch(train, train_time, self.loaders[k][1])
                except Preempted as e:  # every member checkpoints before the pack stops
                    preempted = preempted or e
            if preempted is not None:
                raise preempted
        for trainer in self.trainers:
            if trainer.status == RunStatus.RUNNING:
                trainer.status = RunStatus.COMPLETED

    def train_epoch(self, members: list[int], progress: dict, batches: dict, start: int) -> list[int]:
        """The epoch's batches for ``members``, stacked; returns those that did not diverge in it (a member whose
        guard trips leaves the pack at that step, as a trial alone leaves its epoch)."""
        from cnnlab.core.errors import Preempted
        from cnnlab.training.metrics import autocast_for

        running = list(members)
        pack = Pack([self.trainers[k].model for k in running])
        smoothing = self.smoothing(running)
        for i in range(start, self.batches):
            pairs = [next(batches[k]) for k in running]
            xs, ys = torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
            watching = [self.trainers[k].watching(True) for k in running]
            pack.zero_grad()
            with autocast_for(self.device, self.autocast_dtype):
                logits = pack(xs, per_member=True, generators=None if self.generators is None
                              else [self.generators[k] for k in running])
            losses = member_losses(logits, ys, smoothing)
            losses.sum().backward()
            pack.share_grads()
            tripped, preempted = [], None
            for j, k in enumerate(running):
                trainer = self.trainers[k]
                trainer.data_loss = losses[j]
                trainer.update()
                if watching[j]:
                    trainer.watch_updates()
                if trainer.record_step(logits[j].detach(), ys[j], losses[j], progress[k].sums):
                    tripped.append(k)
                    continue
                self.as_member(k)
                try:
                    trainer.between_steps(progress[k], i, True, self.batches)
                except Preempted as e:  # every member checkpoints before the pack stops
                    preempted = preempted or e
            if preempted is not None:
                raise preempted
            if tripped:
                for k in tripped:
                    batches[k].close()
                running = [k for k in running if k not in tripped]
                if not running:
                    break
                pack = Pack([self.trainers[k].model for k in running])
                smoothing = self.smoothing(running)
        return members

    def smoothing(self, members: list[int]) -> torch.Tensor:
        return torch.tensor([self.trainers[k].settings.label_smoothing for k in members], device=self.device)
