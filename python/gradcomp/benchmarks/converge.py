"""``gradcomp bench converge``: does a compressed gradient exchange train as well as plain all-reduce?

The same training once per method, for each task and each seed, on ``--world`` ranks (Gloo
on CPU, spawned as ``gradcomp demo`` spawns them, by gradcomp.drivers.launch, or one rank a
process under torchrun), and the final held-out loss of each method against plain
all-reduce's at the same seed. The methods are gradcomp.drivers.methods' specs.

Tasks (``--tasks``):

  lm    a small decoder-only transformer (token and position embeddings, pre-LN blocks of
        causal self-attention and an MLP, an untied output head), character-level, trained
        with AdamW (linear warm-up, cosine decay) on English-like sentences of a small
        probabilistic grammar mixed with two-digit additions ("17+25=42."), text this module
        generates itself (``generate_text``); the held-out text is another draw of the same
        grammar, with another seed
  mlp   the demo's MLP on scikit-learn's digits, SGD with momentum, held out on the demo's
        test split

Every method at a seed starts from the same weights (``torch.manual_seed(seed)`` before the
model is built, on every rank) and sees the same batches: each rank draws its own, from a
generator keyed by (seed, step, rank) (lm) or from its shard of a per-epoch permutation
shared by the ranks (mlp, as in the demo). Plain all-reduce runs at every seed, so the
table shows the seed-to-seed spread of exact training beside each method's difference.

The held-out loss is measured every ``--eval-every`` steps for the curves, each rank on its
shard of the held-out set, outside the timed steps; the shards are summed once a run is
over, after the method is detached (so no evaluation traffic is counted as the method's).

``diloco:<codec>:H=<n>`` methods (gradcomp.DiLoCo) train the plain model with the task's own
optimizer (AdamW for lm) as the inner one, syncing every n steps; bytes per step are the
syncs' bytes over all steps. Between syncs each rank evaluates its own local weights, so a
point of the curve mixes the ranks' models; after a sync (the final point, where n divides
the steps) every rank holds the anchor.

``fsdp`` and ``fsdp:<sharded method>`` methods (``fsdp:int8``, ``fsdp:int8+ag:int8``: as
``gradcomp bench net --fsdp`` takes them) shard the model with FSDP2 over the world (each
transformer block, embedding and head a unit). Evaluating such a model runs its forward,
which gathers the weights (compressed, with ``+ag:``): the held-out loss is that of the weights
forward computes with, and the evaluations' bytes are left out of the method's count.

    gradcomp bench converge [--tasks lm,mlp] [--methods allreduce,int8,...] [--world 4]
                            [--seeds 0,1] [--steps N] [--json PATH] [--plot PATH.png]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..drivers.digits import load_digits_split, make_model
from ..drivers.launch import DEMO_PACKAGES, init_rank, missing_packages, run_ranks
from ..drivers.methods import (
    DEFAULT_METHODS,
    DEMO_KINDS,
    FSDP_PREFIX,
    AttachOptions,
    attach,
    is_diloco_method,
    is_node_method,
    parse_methods,
    parse_sharded,
)

TASKS = ("lm", "mlp")
BASELINE = "allreduce"

# ---- the lm task's text -----------------------------------------------------------------

ALPHABET = "\n .+=0123456789abcdefghijklmnopqrstuvwxyz"  # the lm's vocabulary: every character the text uses
TRAIN_TEXT_SEED = 1
HELDOUT_TEXT_SEED = 2  # the held-out text: the same grammar, drawn with another seed
TRAIN_CHARS = 400_000
HELDOUT_WINDOWS = 256  # held-out windows of context + 1 characters, shared out among the ranks

_NOUNS = (("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("child", "children"), ("mouse", "mice"),
          ("farmer", "farmers"), ("teacher", "teachers"), ("box", "boxes"), ("river", "rivers"),
          ("tree", "trees"), ("king", "kings"), ("robot", "robots"))
_TRANSITIVE = (("sees", "see"), ("likes", "like"), ("chases", "chase"), ("finds", "find"),
               ("carries", "carry"), ("watches", "watch"), ("follows", "follow"), ("helps", "help"))
_INTRANSITIVE = (("sleeps", "sleep"), ("runs", "run"), ("waits", "wait"), ("sings", "sing"), ("falls", "fall"))
_DETERMINERS = (("the", "a", "every", "this", "one"), ("the", "some", "two", "these", "many"))  # singular, plural
_ADJECTIVES = ("small", "big", "red", "old", "happy", "quiet", "green", "lazy")
_PREPOSITIONS = ("near", "under", "behind", "with", "above")
_ADVERBS = ("quickly", "slowly", "again", "today")
_CONJUNCTIONS = ("and", "but", "because", "while")


def _noun_phrase(rng: random.Random, nested: bool = False) -> tuple[list[str], bool]:
    """(words, plural): a determiner and noun that agree, adjectives, now and then a
    prepositional phrase whose own noun's number is drawn apart (an attractor for the verb)."""
    plural = rng.random() < 0.4
    words = [rng.choice(_DETERMINERS[plural])]
    while len(words) < 3 and rng.random() < 0.35:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS)[plural])
    if not nested and rng.random() < 0.25:
        words += [rng.choice(_PREPOSITIONS), *_noun_phrase(rng, nested=True)[0]]
    return words, plural


def _clause(rng: random.Random) -> list[str]:
    subject, plural = _noun_phrase(rng)
    if rng.random() < 0.6:
        return [*subject, rng.choice(_TRANSITIVE)[plural], *_noun_phrase(rng)[0]]
    words = [*subject, rng.choice(_INTRANSITIVE)[plural]]
    if rng.random() < 0.4:
        words.append(rng.choice(_ADVERBS))
    return words


def _line(rng: random.Random) -> str:
    if rng.random() < 0.2:  # arithmetic: the answer is a function of the line, learnt slowly
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a}+{b}={a + b}."
    words = _clause(rng)
    if rng.random() < 0.3:
        words += [rng.choice(_CONJUNCTIONS), *_clause(rng)]
    return " ".join(words) + " ."


def generate_text(seed: int, n_chars: int) -> str:
    """``n_chars`` characters of the lm task's text, one sentence or addition a line: the
    same for the same seed on every machine (Python's ``random.Random``, no downloads)."""
    rng = random.Random(seed)
    lines, total = [], 0
    while total < n_chars:
        line = _line(rng)
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines)[:n_chars]


def encode(text: str) -> torch.Tensor:
    """The text as int64 indices into ALPHABET."""
    lookup = torch.full((256,), -1, dtype=torch.int64)
    lookup[torch.tensor(list(ALPHABET.encode()))] = torch.arange(len(ALPHABET))
    tokens = lookup[torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()]
    if (tokens < 0).any():
        raise ValueError("text has characters outside the lm's alphabet")
    return tokens


# ---- the lm task's model ----------------------------------------------------------------


class CausalBlock(nn.Module):
    """A pre-LN transformer block: causal multi-head self-attention, then a 4× GELU MLP."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """A decoder-only transformer language model: (batch, time) indices -> (batch, time, vocab) logits."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, context: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(CausalBlock(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        for emb in (self.tok, self.pos):  # GPT-2's scale: N(0, 1) embeddings swamp the first block
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def warmup_cosine(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """The lr factor at ``step`` (0-based) of ``steps``: linear from 1/warmup to 1 over the
    first ``warmup`` steps, then a cosine down to ``floor`` at the last."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- tasks ------------------------------------------------------------------------------


class LMTask:
    """The character-level language model on the generated text (see the module's docstring)."""

    name = "lm"
    default_steps = 300
    default_batch = 16  # sequences of --context characters, per rank

    def __init__(self, args, rank: int, world: int, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.steps = args.steps or self.default_steps
        self.batch = args.batch or self.default_batch
        self.context = args.context
        self.warmup = min(20, max(1, self.steps // 10))
        self.train = encode(generate_text(TRAIN_TEXT_SEED, TRAIN_CHARS))
        held = encode(generate_text(HELDOUT_TEXT_SEED, HELDOUT_WINDOWS * (self.context + 1)))
        windows = held.view(HELDOUT_WINDOWS, self.context + 1)[rank::world]  # this rank's shard
        self.heldout = windows.to(device)

    def model(self) -> nn.Module:
        a = self.args
        return TinyLM(len(ALPHABET), a.d_model, a.heads, a.layers, a.context)

    def optimizer(self, params, freeze_step: int | None = None):
        """AdamW: torch's, or with ``freeze_step`` gradcomp.optim.AdamW, whose variance stops
        changing after that many steps (1-bit Adam's recipe for low-bit codecs)."""
        settings = {"lr": self.args.lm_lr, "betas": (0.9, 0.95), "weight_decay": 0.01}
        if freeze_step is None:
            return torch.optim.AdamW(params, **settings)
        from ..optim import AdamW

        return AdamW(params, freeze_step=freeze_step, **settings)

    def schedule(self, optimizer):
        """Linear warm-up, then a cosine decay."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, self.steps, self.warmup))

    def batch_at(self, seed: int, step: int):
        """(inputs, targets) of this rank at ``step``: windows at offsets drawn from a generator
        keyed by (seed, step, rank), so every method sees the same ones."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + self.rank)
        starts = torch.randint(0, len(self.train) - self.context - 1, (self.batch,), generator=g)
        windows = self.train[starts[:, None] + torch.arange(self.context + 1)].to(self.device)
        return windows[:, :-1], windows[:, 1:]

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)

    @torch.no_grad()
    def heldout_sum(self, model: nn.Module) -> tuple[float, int]:
        """(summed loss, tokens) over this rank's shard of the held-out windows."""
        x, y = self.heldout[:, :-1], self.heldout[:, 1:]
        return float(self.loss(model(x), y, reduction="sum")), y.numel()

    def meta(self, parameters: int) -> dict:
        a = self.args
        return {"model": "decoder-only transformer, character-level, untied head", "parameters": parameters,
                "d_model": a.d_model, "heads": a.heads, "layers": a.layers, "context": a.context,
                "vocab": len(ALPHABET), "steps": self.steps, "batch_per_rank": self.batch,
                "tokens_per_step_per_rank": self.batch * a.context,
                "optimizer": "AdamW", "lr": a.lm_lr, "betas": [0.9, 0.95], "weight_decay": 0.01,
                "schedule": f"linear warm-up over {self.warmup} steps, cosine decay to 0.1 × lr",
                "train_chars": TRAIN_CHARS, "train_text_seed": TRAIN_TEXT_SEED,
                "heldout_tokens": HELDOUT_WINDOWS * a.context, "heldout_text_seed": HELDOUT_TEXT_SEED}

    @staticmethod
    def describe(meta: dict) -> str:
        blocks = f"{meta['layers']} block{'s' * (meta['layers'] != 1)}"
        return (f"character-level transformer of {meta['parameters']:,} parameters ({blocks}, "
                f"d_model {meta['d_model']}, context {meta['context']}), {meta['steps']} steps of "
                f"{meta['batch_per_rank']}×{meta['context']} tokens per rank, AdamW lr {meta['lr']:g}")


class MLPTask:
    """The demo's MLP on digits, SGD with momentum, held out on the demo's test split."""

    name = "mlp"
    default_steps = 200  # 18 epochs of 4 ranks × 32
    default_batch = 32

    def __init__(self, args, rank: int, world: int, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.steps = args.steps or self.default_steps
        self.batch = args.batch or self.default_batch
        self.x_train, self.y_train, x_test, y_test = load_digits_split(0)  # the demo's split, whatever the seed
        self.steps_per_epoch = len(self.y_train) // (self.batch * world)
        if self.steps_per_epoch == 0:
            raise SystemExit(f"gradcomp bench converge: {len(self.y_train)} digits make no step of "
                             f"{self.batch} × {world}")
        self.heldout_samples = len(y_test)
        self.x_test, self.y_test = x_test[rank::world].to(device), y_test[rank::world].to(device)
        self._epoch = self._order = None

    def model(self) -> nn.Module:
        return make_model(self.args.width)

    def optimizer(self, params, freeze_step: int | None = None):  # SGD: nothing to freeze
        return torch.optim.SGD(params, lr=self.args.mlp_lr, momentum=0.9)

    def schedule(self, optimizer):  # a constant lr
        return None

    def batch_at(self, seed: int, step: int):
        """This rank's batch at ``step``: its interleaved shard of the epoch's permutation, one
        permutation shared by the ranks (the demo's)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            g = torch.Generator().manual_seed(seed * 1000 + epoch)
            self._order = torch.randperm(len(self.y_train), generator=g)[self.rank::self.world]
        idx = self._order[i * self.batch:(i + 1) * self.batch]
        return self.x_train[idx].to(self.device), self.y_train[idx].to(self.device)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits, targets, reduction=reduction)

    @torch.no_grad()
    def heldout_sum(self, model: nn.Module) -> tuple[float, int]:
        return float(self.loss(model(self.x_test), self.y_test, reduction="sum")), len(self.y_test)

    def meta(self, parameters: int) -> dict:
        return {"model": "MLP 64-width-width-10 (the demo's)", "parameters": parameters, "width": self.args.width,
                "steps": self.steps, "batch_per_rank": self.batch, "steps_per_epoch": self.steps_per_epoch,
                "optimizer": "SGD", "lr": self.args.mlp_lr, "momentum": 0.9, "schedule": "constant",
                "train_samples": len(self.y_train), "heldout_samples": self.heldout_samples}

    @staticmethod
    def describe(meta: dict) -> str:
        return (f"digits MLP of {meta['parameters']:,} parameters, {meta['steps']} steps of "
                f"{meta['batch_per_rank']} per rank, SGD lr {meta['lr']:g} momentum 0.9")


TASK_CLASSES = {"lm": LMTask, "mlp": MLPTask}


# ---- arguments --------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gradcomp bench converge",
                                description="training quality: each method's final held-out loss against plain "
                                            "all-reduce's, per task and seed")
    p.add_argument("--tasks", default="lm,mlp", help=f"comma-separated, of {', '.join(TASKS)} (default lm,mlp)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: allreduce, torch-fp16, torch-powersgd[:R], gradcomp codec specs, "
                        "diloco:..., fsdp and fsdp:<sharded method> (FSDP2 over the world: fsdp:int8+ag:int8) "
                        f"(default {','.join(DEFAULT_METHODS)}); allreduce, the baseline, is added if missing")
    p.add_argument("--world", type=int, default=4, help="ranks to spawn (ignored under torchrun); default 4")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds, every method at each (default 0,1)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps of every task (default lm {LMTask.default_steps}, mlp {MLPTask.default_steps})")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch per rank: sequences (lm, default {LMTask.default_batch}) or samples "
                        f"(mlp, default {MLPTask.default_batch})")
    p.add_argument("--eval-every", type=int, default=20, help="held-out loss every K steps, for the curves")
    p.add_argument("--start-step", type=int, default=0,
                   help="steps of plain all-reduce before gradcomp compresses (torch's PowerSGD: max(2, N))")
    p.add_argument("--freeze-variance", type=int, default=None, metavar="N",
                   help="lm: every method but allreduce trains with gradcomp.optim.AdamW, whose variance is "
                        "frozen after N steps (1-bit Adam's recipe; pair with --start-step N); allreduce keeps "
                        "torch's AdamW")
    p.add_argument("--lm-lr", type=float, default=3e-3, help="lm: AdamW's peak lr (default 3e-3)")
    p.add_argument("--mlp-lr", type=float, default=0.02, help="mlp: SGD's lr (default 0.02)")
    p.add_argument("--d-model", type=int, default=128, help="lm: width (default 128)")
    p.add_argument("--heads", type=int, default=4, help="lm: attention heads (default 4)")
    p.add_argument("--layers", type=int, default=2, help="lm: transformer blocks (default 2)")
    p.add_argument("--context", type=int, default=64, help="lm: context in characters (default 64)")
    p.add_argument("--width", type=int, default=1024, help="mlp: hidden width (default 1024, the demo's)")
    p.add_argument("--bucket-cap-mb", type=float, default=1.0, help="DDP's bucket cap (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA with NCCL when there is a GPU per rank, else CPU with Gloo")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--plot", default="gradcomp-converge.png", help="PNG of the held-out loss curves ('' for none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        args.methods = parse_methods(args.methods, DEMO_KINDS)
    except ValueError as e:
        p.error(str(e))
    hpz = [m for m in args.methods if m.startswith(FSDP_PREFIX) and parse_sharded(m[len(FSDP_PREFIX):]).hpz]
    if hpz:
        p.error(f"{', '.join(hpz)}: bench converge runs a flat world of one-rank nodes; +hpz keeps backward's gather "
                "inside a node, for gradcomp bench net --fsdp --ranks-per-node")
    node = [m for m in args.methods if is_node_method(m)]
    if node:
        p.error(f"{', '.join(node)}: bench converge runs a flat world; node:<spec> methods are for gradcomp demo "
                "and bench net (--ranks-per-node)")
    if BASELINE not in args.methods:  # every difference is against it
        args.methods.insert(0, BASELINE)
    args.tasks = _csv(args.tasks)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        p.error(f"unknown task {', '.join(map(repr, unknown))}: the tasks are {', '.join(TASKS)}" if unknown
                else "no tasks given")
    if len(set(args.tasks)) != len(args.tasks):
        p.error(f"a task is listed twice: {','.join(args.tasks)}")
    try:
        args.seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds takes distinct integers >= 0, got {','.join(map(str, args.seeds)) or 'none'}")
    for name in ("world", "eval_every", "d_model", "heads", "layers", "context", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("steps", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.start_step < 0:
        p.error("--start-step must be >= 0")
    if args.freeze_variance is not None and args.freeze_variance < 1:
        p.error("--freeze-variance must be >= 1")
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
    return args


# ---- training ---------------------------------------------------------------------------


def _train_one(task, method: str, seed: int, args, device, backend: str, progress) -> dict:
    """One training run of ``task`` with ``method`` at ``seed``; every rank returns its record,
    the held-out curve and training losses already summed over the ranks."""
    import torch.distributed as dist

    torch.manual_seed(seed)  # the same initial weights on every rank, for every method
    model = task.model().to(device)
    # the baseline is plain AdamW; --freeze-variance changes the per-step compressed methods' optimizer
    freeze_step = None if method == BASELINE or is_diloco_method(method) else args.freeze_variance
    options = AttachOptions(backend=backend, device=device, bucket_cap_mb=args.bucket_cap_mb,
                            start_step=args.start_step)
    setup = attach(method, model, lambda parameters: task.optimizer(parameters, freeze_step), options)
    schedule = task.schedule(setup.optimizer)
    steps = task.steps
    eval_at = sorted({*range(0, steps, args.eval_every), steps})
    heldout, losses, step_seconds = [], [], []
    evaluation_bytes = 0.0  # what evaluating sent (an FSDP model gathers its weights): not the method's
    started = time.perf_counter()
    with setup.method as attached:
        for step in range(steps + 1):
            if step in eval_at:  # the model after `step` steps: the inner module (DDP), the sharded one (FSDP)
                before = attached.bytes_sent(step)
                heldout.append(task.heldout_sum(model))
                evaluation_bytes += attached.bytes_sent(step) - before
            if step == steps:
                break
            inputs, targets = task.batch_at(seed, step)
            step_started = time.perf_counter()
            setup.optimizer.zero_grad(set_to_none=True)
            loss = task.loss(setup.module(inputs), targets)
            loss.backward()
            setup.optimizer.step()
            if schedule is not None:
                schedule.step()
            attached.after_step()  # DiLoCo's outer step every H steps; nothing for the others
            loss_value = loss.item()  # waits for the device: the step is done
            step_seconds.append(time.perf_counter() - step_started)
            losses.append(loss_value)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        sent = attached.bytes_sent(steps) - evaluation_bytes
        codec_seconds = attached.codec_seconds()
        stats = dict(attached.state.stats) if attached.state is not None else None
    wall_s = time.perf_counter() - started  # the steps and the evaluations
    # the shards summed once the method is detached: its byte count never sees these
    sums, train = _summed(heldout, device), _summed(losses, device)
    curve = (sums[:, 0] / sums[:, 1]).tolist()
    skip = min(len(step_seconds) - 1, max(2, len(step_seconds) // 10))  # DDP's first steps build buckets
    return {
        "task": task.name, "method": method, "seed": seed, "steps": steps,
        "final_loss": curve[-1],
        "curve": {"step": eval_at, "heldout_loss": curve},
        "train_loss": (train / dist.get_world_size()).tolist(),
        "bytes_per_step": sent / steps,
        "step_ms": 1e3 * statistics.median(step_seconds[skip:]),
        "step_ms_mean": 1e3 * statistics.fmean(step_seconds[skip:]),
        "codec_ms_per_step": 1e3 * codec_seconds / steps,
        "wall_s": wall_s,
        "bucket_cap_mb": setup.bucket_cap_mb,
        "stats": stats,
    }


def _summed(values: list, device) -> torch.Tensor:
    """``values`` (numbers, or rows of them) summed over the ranks, in float64."""
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total


def run_rank(args, rank: int, world: int, local_rank: int) -> dict | None:
    """Trains every (task, seed, method) on this rank; rank 0 returns the results, the others None."""
    import torch.distributed as dist

    import gradcomp

    device, backend = init_rank("gradcomp bench converge", args.device, rank, world, local_rank)
    try:
        runs, tasks_meta = [], {}
        for name in args.tasks:
            task = TASK_CLASSES[name](args, rank, world, device)
            tasks_meta[name] = task.meta(sum(p.numel() for p in task.model().parameters()))
            for seed in args.seeds:
                for method in args.methods:
                    progress = None
                    if rank == 0 and not args.no_progress:
                        from tqdm import tqdm

                        progress = tqdm(total=task.steps, desc=f"{name} seed {seed} {method:<16}", unit="step",
                                        mininterval=0.5, file=sys.stderr)
                    try:
                        runs.append(_train_one(task, method, seed, args, device, backend, progress))
                    finally:
                        if progress is not None:
                            progress.close()
        meta = {"world": world, "backend": backend, "device": str(device), "tasks": tasks_meta,
                "methods": args.methods, "seeds": args.seeds, "baseline": BASELINE, "eval_every": args.eval_every,
                "start_step": args.start_step, "freeze_variance": args.freeze_variance,
                "bucket_cap_mb": args.bucket_cap_mb, "torch": torch.__version__,
                "gradcomp": gradcomp.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        return {"meta": meta, "runs": runs} if rank == 0 else None
    finally:
        dist.destroy_process_group()


# ---- the report -------------------------------------------------------------------------


def seed_spread(losses: list[float]) -> float | None:
    """Plain all-reduce's seed-to-seed spread in %: (max − min) / mean over the seeds
    (|loss(seed 0) − loss(seed 1)| / mean for two); None for one seed."""
    if len(losses) < 2:
        return None
    return 100 * (max(losses) - min(losses)) / statistics.fmean(losses)


def summarize(out: dict) -> list[dict]:
    """One row per (task, method): mean final held-out loss over the seeds, its difference
    from plain all-reduce's in % (paired per seed, then averaged), the per-seed losses,
    bytes per step, ratio and median step time. Adds each run's ``ratio``."""
    rows = []
    runs = out["runs"]
    for task in out["meta"]["tasks"]:
        base = {r["seed"]: r for r in runs if r["task"] == task and r["method"] == BASELINE}
        base_bytes = statistics.fmean(r["bytes_per_step"] for r in base.values())
        for method in out["meta"]["methods"]:
            mine = [r for r in runs if r["task"] == task and r["method"] == method]
            for r in mine:
                r["ratio"] = base_bytes / r["bytes_per_step"] if r["bytes_per_step"] else math.inf
            losses = [r["final_loss"] for r in mine]
            diffs = [100 * (r["final_loss"] - base[r["seed"]]["final_loss"]) / base[r["seed"]]["final_loss"]
                     for r in mine]
            bytes_per_step = statistics.fmean(r["bytes_per_step"] for r in mine)
            rows.append({"task": task, "method": method, "final_loss": statistics.fmean(losses),
                         "diff_pct": statistics.fmean(diffs), "per_seed": dict(zip([r["seed"] for r in mine], losses)),
                         "bytes_per_step": bytes_per_step,
                         "ratio": base_bytes / bytes_per_step if bytes_per_step else math.inf,
                         "step_ms": statistics.median(r["step_ms"] for r in mine)})
    return rows


def report(out: dict, args) -> None:
    meta = out["meta"]
    rows = out["summary"] = summarize(out)
    out["baseline_spread_pct"] = {
        task: seed_spread([r["final_loss"] for r in out["runs"] if r["task"] == task and r["method"] == BASELINE])
        for task in meta["tasks"]}
    seeds = ",".join(map(str, meta["seeds"]))
    print(f"\ngradcomp bench converge: {meta['world']} ranks ({meta['backend']}, {meta['device'].split(':')[0]}), "
          f"seeds {seeds}")
    for task, tm in meta["tasks"].items():
        print(f"  {task}: {TASK_CLASSES[task].describe(tm)}")
    if meta.get("start_step"):
        print(f"  gradcomp's methods reduce exactly for the first {meta['start_step']} steps (--start-step)")
    if meta.get("freeze_variance") is not None:
        print(f"  lm: every method but allreduce trains with gradcomp.optim.AdamW, its variance frozen after "
              f"{meta['freeze_variance']} steps (--freeze-variance)")
    width = max(len("method"), *(len(r["method"]) for r in rows))
    seeds_width = max(len("per seed"), 8 * len(meta["seeds"]) - 1)
    print(f"{'task':<5} {'method':<{width}} {'held-out loss':>13} {'vs allreduce':>12} {'per seed':>{seeds_width}}"
          f" {'bytes sent/step':>16} {'ratio':>8} {'step ms':>8}")
    for r in rows:
        per_seed = " ".join(f"{v:7.4f}" for v in r["per_seed"].values())
        print(f"{r['task']:<5} {r['method']:<{width}} {r['final_loss']:>13.4f} {r['diff_pct']:>+11.2f}%"
              f" {per_seed:>{seeds_width}} {r['bytes_per_step']:>16,.0f} {r['ratio']:>7.1f}x"
              f" {r['step_ms']:>8.1f}")
    for task, spread in out["baseline_spread_pct"].items():
        if spread is None:
            print(f"{task}: one seed, no spread of plain all-reduce to compare with (give --seeds 0,1)")
        else:
            how = "|loss(seed a) - loss(seed b)|" if len(meta["seeds"]) == 2 else "(max - min)"
            print(f"{task}: plain all-reduce's seed-to-seed spread {spread:.2f}% ({how} / mean, seeds {seeds})")
    print("(held-out loss: cross-entropy on the held-out set after the last step, mean over the seeds; vs allreduce: "
          "the difference from plain all-reduce's at the same seed, mean over the seeds; bytes: what rank 0 put on "
          "the wire per step; ratio: plain all-reduce's bytes over the method's; step: median, informational)")
    if args.plot:
        plot(out, args.plot)
        print(f"loss curves: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"results: {args.json}")


def plot(out: dict, path: str) -> None:
    """One subplot per task: held-out loss against step for each method, the first seed
    solid, the others dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    meta = out["meta"]
    tasks = list(meta["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(meta["methods"]) > len(colors):  # no two methods of one plot in the same colour
        colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    ratios = {(r["task"], r["method"]): r["ratio"] for r in out.get("summary", [])}
    for ax, task in zip(axes[0], tasks):
        for i, method in enumerate(meta["methods"]):
            for r in (r for r in out["runs"] if r["task"] == task and r["method"] == method):
                first = r["seed"] == meta["seeds"][0]
                ratio = ratios.get((task, method))
                label = None
                if first:
                    label = method if method == BASELINE or not ratio else \
                        f"{method} ({ratio:.{1 if ratio < 10 else 0}f}x fewer bytes)"
                ax.plot(r["curve"]["step"], r["curve"]["heldout_loss"], color=colors[i % len(colors)],
                        linestyle="-" if first else "--", linewidth=1.5 if first else 0.8, alpha=1 if first else 0.6,
                        label=label)
        ax.set(xlabel="step", ylabel="held-out loss", yscale="log",
               title=f"{task}: {meta['tasks'][task]['parameters']:,} parameters, {meta['world']} ranks")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FormatStrFormatter("%g"))  # 0.7, not 7 × 10⁻¹
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"held-out loss (seed {meta['seeds'][0]} solid, other seeds dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- launch -----------------------------------------------------------------------------


def _needed_packages(args) -> list[str]:
    needed = {"sklearn"} if "mlp" in args.tasks else set()
    needed |= {"matplotlib"} if args.plot else set()
    needed |= set() if args.no_progress else {"tqdm"}
    return missing_packages([name for name in DEMO_PACKAGES if name in needed])


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = _needed_packages(args)
    if missing:
        print(f"gradcomp bench converge needs {', '.join(missing)} here: pip install 'gradcomp[demo]'",
              file=sys.stderr)
        return 1
    what = f"tasks {', '.join(args.tasks)}, methods {', '.join(args.methods)}, seeds {','.join(map(str, args.seeds))}"
    return run_ranks("gradcomp bench converge", args, run_rank, report, what)
