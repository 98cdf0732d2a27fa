"""
runs.py -- a run's start, files and checkpoints. OPTIONAL READING: nsr.train calls these around its loop,
and nsr.rl_step calls five of them for the plumbing of a step (prompt_batch, sample_rollouts,
training_logprobs, count_clipped, step_metrics); the loss and the update are all in nsr.py.

    start(cfg, objectives) -> (cfg, Run)   check the config, fill in the toy world, prepare the run
                                           directory, load the models, optimizers and data, resume
    prompt_batch, sample_rollouts          the problems of a step and their rollouts (divergence = a clear stop)
    training_logprobs                      log pi_old by the training forward (the ratio's denominator)
    StepStats, step_metrics                what a step did -> its metrics.jsonl line (docs/training.md)
    evaluate, finish                       Pass@k on every eval set -> eval/, eval.jsonl, the final table
    save_checkpoint, latest_checkpoint     atomic checkpoints that resume a run exactly

THE RUN DIRECTORY (--out-dir): config.json (the resolved Config), metrics.jsonl (one line per step),
eval.jsonl (one line per evaluation and set), eval/step<NNNNNN>_<set>.json (each evaluation's per-problem
counts), checkpoint-<NNNNNN>/ (model, tokenizer, critic/, trainer_state.pt) and `latest`, which names it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

import loading
import passk
import ppo
import precision
import sample
import settings
import toy


@dataclass
class Run:
    """Everything the loop reads and updates, built by start() (a plain record, no behaviour)."""
    dir: pathlib.Path             # the run directory (--out-dir)
    policy: precision.Trainable
    tokenizer: object
    critic: precision.Trainable | None   # ppo only
    ref_model: object | None      # the frozen initial policy, when a KL term is on
    generator: torch.Generator    # all training-rollout randomness
    prompt_ids: list              # token ids of every training prompt
    problems: list                # the training problems (gold answers), aligned with prompt_ids
    eval_sets: dict               # {name: problems}
    evals: dict                   # {name: {step: passk result}}
    start_step: int
    head_chunk: int               # sample.response_logprobs' head_chunk (0 without gradient checkpointing)
    pad_id: int
    nonfinite_streak: int = 0     # consecutive skipped steps (saved in checkpoints: a resume keeps counting)


def bare_run(policy: precision.Trainable, ref_model=None, head_chunk: int = 0, pad_id: int = 0) -> Run:
    """A Run holding only what one backward pass reads (nsr.minibatch_backward: the policy, the reference
    model, head_chunk, pad_id); no directory, data or sampler. The one stand-in Run of the tests and bench.py."""
    return Run(dir=None, policy=policy, tokenizer=None, critic=None, ref_model=ref_model, generator=None,
               prompt_ids=[], problems=[], eval_sets={}, evals={}, start_step=0, head_chunk=head_chunk,
               pad_id=pad_id)


# ---- start: check every input, resolve, prepare the directory, load ------------------------------
# The order is the order of cost: every input the user named (config values, --resume, data files, the
# template) is checked before anything is built, moved or loaded, and a bad one stops the run with ONE
# message (settings.UserError -> exit status 2). One exception: with no --model, resolve() builds the toy
# base (or reuses its cache; a stale build is moved aside, never deleted) BEFORE check_inputs reads the
# model's files, because those files are what it checks.

@dataclass
class Inputs:
    """What start() read and checked before the run directory is touched or any weights are loaded."""
    checkpoint: pathlib.Path | None   # --resume: the checkpoint to continue from
    problems: list                    # the training problems kept (prompt within --max-prompt-len)
    prompt_ids: list                  # their prompts' token ids
    skipped: int                      # training prompts skipped as too long
    eval_sets: dict                   # {name: problems}


def start(cfg, objectives) -> tuple[object, Run]:
    """Everything before the first step -> (the resolved cfg, the Run)."""
    settings.check_config(cfg, objectives)                     # the values (no I/O)
    check_out_dir(cfg)                                         # a run's directory, or new (never someone's model)
    ckpt = resume_checkpoint(cfg)                              # --resume: is there anything to resume?
    data = {path: read_problems(path, cfg) for path in [cfg.train, *cfg.eval] if path}   # files given: parsed
    if not cfg.model:
        check_template(toy.build_tokenizer(), cfg, "the toy world")   # before the toy base is built
    cfg = resolve(cfg)                                         # the toy world: built here when not cached
    inputs = check_inputs(cfg, ckpt, data)                     # the model(s), the toy's files, the prompts
    print("config:\n" + json.dumps(dataclasses.asdict(cfg), indent=1))
    run_dir = prepare_run_dir(cfg, ckpt)                       # an earlier run is moved aside, never deleted
    return cfg, setup(cfg, run_dir, inputs)


def side_configs(cfg, objectives: list[str], known) -> dict:
    """The configs of nsr.train_side_by_side: one per objective, out_dir <out_dir>/<objective> (each run
    resumable on its own: --resume continues the runs that have a checkpoint and starts the others), each
    checked (settings.check_config) before any run starts, and --out-dir holding nothing but those run
    directories (and their moved-aside <objective>.N) -> {objective: cfg}."""
    parent = pathlib.Path(cfg.out_dir)      # holds the objectives' run directories and nothing else
    others = sorted(p.name for p in parent.iterdir() if p.name.split(".")[0] not in objectives) if parent.is_dir() else []
    if parent.exists() and (not parent.is_dir() or others):
        raise settings.UserError(f"--out-dir {parent} holds files that are not a run's ({', '.join(others[:4]) or 'a file'}"
                                 f"{', ...' if len(others) > 4 else ''}): the runs side by side need a new directory, "
                                 f"or one holding only {', '.join(objectives)}/")
    SIDE_BY_SIDE.update(parent=str(parent.resolve()), base_evals={})    # the base is evaluated once for all
    cfgs = {}
    for objective in objectives:
        out_dir = parent / objective
        cfgs[objective] = dataclasses.replace(cfg, objective=objective, out_dir=str(out_dir),
                                              resume=cfg.resume and latest_checkpoint(out_dir) is not None)
        settings.check_config(cfgs[objective], known)
    return cfgs


def resolve(cfg):
    """The derived values, in one place: the toy world's model and data when --model / --train / --eval are
    not given, and every field left None (the official recipe's value): the KL coefficient (0.001 for grpo,
    a k3 KL loss, and for ppo, in its reward; 0 otherwise), each clip side (--clip-eps) and the evaluation's
    response limit (--max-new-tokens). What it returns is what config.json records."""
    kl = cfg.kl_coef if cfg.kl_coef is not None else (0.001 if cfg.objective in ("grpo", "ppo") else 0.0)
    low, high = settings.clip_sides(cfg)
    cfg = dataclasses.replace(cfg, kl_coef=kl, clip_low=low, clip_high=high,
                              eval_max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens)
    if cfg.model:
        return cfg
    base = pathlib.Path(toy.ensure_base(recipe=toy.ToyRecipe(seed=cfg.toy_seed)))
    return dataclasses.replace(cfg, model=str(base), train=cfg.train or str(base / "train.jsonl"),
                               eval=cfg.eval or [str(base / "test_easy.jsonl"), str(base / "test_hard.jsonl")])


def resolve_for_plan(cfg, objectives):
    """--dry-run: the checked, resolved config of a real model (nothing is built or loaded)."""
    settings.check_config(cfg, objectives)                     # with --dry-run's own: a model to plan
    return resolve(cfg)


def check_out_dir(cfg) -> None:
    """--out-dir must be new, empty, or a run's directory: a file, or a directory holding anything else
    (a model, a checkpoint, the cwd), is refused, so that a run never overwrites what is not a run's."""
    run_dir = pathlib.Path(cfg.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise settings.UserError(f"--out-dir {run_dir} is a file; give a directory")
    ours = {"config.json", "metrics.jsonl", "eval.jsonl", "latest", "latest.tmp", "eval",
            "log.txt", "job.json", "result.json"}                 # (the last three: reproduce.py's job files)
    others = [p.name for p in run_dir.iterdir() if p.name not in ours and not p.name.startswith(("checkpoint-",
              ".tmp-checkpoint-"))] if run_dir.is_dir() else []
    config = run_dir / "config.json"
    try:
        foreign = config.is_file() and "objective" not in json.loads(config.read_text())
    except ValueError:
        foreign = True
    if others or foreign:
        raise settings.UserError(f"--out-dir {run_dir} holds files that are not a run's ({', '.join(sorted(others)[:4]) or 'config.json'}"
                                 f"{', ...' if len(others) > 4 else ''}): give a new or empty directory")


def resume_checkpoint(cfg) -> pathlib.Path | None:
    """--resume: the run directory's latest checkpoint (a UserError when there is none, or when it is past
    --steps); None for a fresh run. The step is read from the checkpoint's name (no weights loaded)."""
    if not cfg.resume:
        return None
    run_dir = pathlib.Path(cfg.out_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise settings.UserError(f"--resume: {run_dir} holds no checkpoint to resume (no {run_dir / 'latest'}); "
                                 f"run without --resume to start a new run there")
    step = int(ckpt.name.split("-")[-1])
    if step > cfg.steps:
        raise settings.UserError(f"--resume: the checkpoint in {run_dir} is at step {step}, past --steps {cfg.steps}")
    return ckpt


def read_problems(path, cfg) -> list[dict]:
    """loading.load_problems, its errors (FILE:LINE, the missing field) as a UserError."""
    try:
        return loading.load_problems(path, cfg.problem_field, cfg.answer_field)
    except (OSError, ValueError) as e:
        raise settings.UserError(str(e)) from None


def check_model(name, flag: str = "--model") -> None:
    """A local model directory whose config and weights can be read, or a hub name that resolves (its
    config only: no weights are downloaded here). Anything else is a UserError naming it."""
    path = pathlib.Path(str(name))
    if path.is_dir():
        problem = unreadable(path)
        if problem and (path / "recipe.json").is_file():               # a cached toy base: say how to rebuild
            recipe = json.loads((path / "recipe.json").read_text())["recipe"]
            where = "" if path.resolve() == toy.base_dir(recipe["seed"]).resolve() else f" --out {path}"
            problem += (f"; it is a cached toy base: rebuild it with `python toy.py --seed {recipe['seed']}"
                        f"{' --quick' if recipe.get('quick') else ''}{where} --force`")
        if problem:
            raise settings.UserError(f"{flag} {name}: {problem}")
        return
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(name)) and not path.parent.is_dir():   # "org/name"
        try:
            AutoConfig.from_pretrained(str(name))
        except (OSError, ValueError) as e:
            raise settings.UserError(f"{flag} {name}: not a local directory, and the hub has no such model or "
                                     f"cannot be reached ({str(e).splitlines()[0]})") from None
        return
    raise settings.UserError(f"{flag} {name}: no such directory")


def unreadable(model_dir: pathlib.Path) -> str | None:
    """Why a local model directory cannot be loaded (its config.json, its weights' headers), or None."""
    try:
        json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"config.json unreadable ({e})"
    weights = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not weights:
        return "no model weights (*.safetensors) in it"
    for f in weights:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), "pt"):
                    pass
            except Exception as e:                                     # safetensors raises its own error type
                return f"{f.name} unreadable ({e})"
    return None


def check_inputs(cfg, ckpt, data: dict) -> Inputs:
    """The model (and the checkpoint) readable, every data file parsed, the template's tokens present,
    every prompt encoded: all before the run directory is touched or a weight is loaded."""
    check_model(cfg.model)
    if ckpt is not None:
        check_model(ckpt, "--resume")
    for path in [cfg.train, *cfg.eval]:
        if path not in data:
            data[path] = read_problems(path, cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt or cfg.model),
                                              local_files_only=loading.is_local(ckpt or cfg.model))
    check_template(tokenizer, cfg, cfg.model)
    prompt_ids, kept, skipped = loading.encode_prompts(tokenizer, data[cfg.train], cfg.template,
                                                       cfg.max_prompt_len)
    if not kept:
        raise settings.UserError(f"{cfg.train}: every prompt is longer than --max-prompt-len {cfg.max_prompt_len}")
    eval_sets = {pathlib.Path(path).stem: data[path][:cfg.eval_limit]
                 for path in (cfg.eval if cfg.eval_n > 0 else [])}
    return Inputs(ckpt, kept, prompt_ids, skipped, eval_sets)


def check_template(tokenizer, cfg, whose: str) -> None:
    """The written-out templates need their special tokens as single tokens of the vocabulary."""
    missing = [t for t in loading.TEMPLATE_TOKENS.get(cfg.template, ()) if t not in tokenizer.get_vocab()]
    if missing:
        raise settings.UserError(f"--template {cfg.template} needs the tokens {', '.join(missing)}, which the "
                                 f"tokenizer of {whose} does not have; use --template auto or plain")


def holds_run(run_dir: pathlib.Path) -> bool:
    """Does a directory hold (part of) a run: its logs, evaluations or checkpoints?"""
    return any((run_dir / name).exists() for name in ("metrics.jsonl", "eval.jsonl", "latest", "eval")) or \
        any(run_dir.glob("checkpoint-*"))


def prepare_run_dir(cfg, ckpt) -> pathlib.Path:
    """The run directory. A fresh run (no --resume) in a directory that holds an earlier run moves that run
    aside to <dir>.1 (.2, ...) and says so: nothing is ever deleted. Writes config.json."""
    run_dir = pathlib.Path(cfg.out_dir)
    if ckpt is not None and (run_dir / "config.json").is_file():
        saved = json.loads((run_dir / "config.json").read_text())
        may_differ = {"resume", "steps", "save_every", "eval_every", "max_nonfinite"}   # not the evaluation:
        # a resumed run re-uses the evaluation of the start that is on disk
        changed = [k for k, v in dataclasses.asdict(cfg).items() if k not in may_differ and saved.get(k) != v]
        if changed:
            print(f"WARNING: resuming with different settings than the stopped run: {', '.join(changed)} "
                  f"(the result will not equal an uninterrupted run)")
    elif ckpt is None and holds_run(run_dir):
        last = latest_checkpoint(run_dir)
        aside = loading.move_aside(run_dir)
        print(f"{run_dir} held an earlier run ({'its last checkpoint: ' + last.name if last else 'no checkpoint'}): "
              f"moved it to {aside}; nothing is deleted (--resume continues a run instead)")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    return run_dir


def setup(cfg, run_dir: pathlib.Path, inputs: Inputs) -> Run:
    """Load the models (from the checkpoint when resuming), optimizers and random state."""
    ckpt = inputs.checkpoint
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                          else cfg.device)
    model, tokenizer = loading.load_model(ckpt or cfg.model, dtype=cfg.dtype, device=device)
    size = sum(p.numel() for p in model.parameters())
    checkpointing = precision.checkpointing_on(cfg, size)
    critic_model = ppo.load_critic(ckpt / "critic" if ckpt else cfg.model, cfg, device) if cfg.objective == "ppo" else None
    for m in (model, critic_model):
        if m is not None:
            if checkpointing:
                precision.enable_gradient_checkpointing(m)
            m.train()    # NOTE: Qwen/Llama have no dropout by default; train() only switches checkpointing on
    ref_model = None
    if cfg.kl_coef > 0:  # the frozen initial policy (always the original --model, also when resuming)
        ref_model, _ = loading.load_model(cfg.model, dtype=cfg.dtype, device=device)
        ref_model.requires_grad_(False)
    policy = precision.make_trainable(model, cfg, cfg.lr)
    critic = precision.make_trainable(critic_model, cfg, cfg.critic_lr) if critic_model is not None else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    start_step, streak = 0, 0
    if ckpt is not None:
        start_step, streak = restore(ckpt, policy, critic, generator)
        for name in ("metrics.jsonl", "eval.jsonl"):
            truncate_jsonl(run_dir / name, start_step)
        print(f"resumed from {ckpt} at step {start_step}")

    # a resumed run re-uses the evaluation of the start that is on disk
    evals = {name: ({0: passk.load_result(eval_path(run_dir, 0, name))}
                    if ckpt is not None and eval_path(run_dir, 0, name).is_file() else {})
             for name in inputs.eval_sets}
    print(f"model {cfg.model}: {size / 1e6:.1f}M parameters, {next(model.parameters()).dtype}, "
          f"{device}, gradient checkpointing {'on' if checkpointing else 'off'}, "
          f"{'fp32 master weights' if policy.master is not policy.params else 'fp32 weights'}"
          f"{' in CPU RAM' if cfg.optimizer_offload else ''}; {len(inputs.problems)} training problems "
          f"({inputs.skipped} skipped as too long)" + ("; critic: a copy with a value head" if critic else ""))
    return Run(run_dir, policy, tokenizer, critic, ref_model, generator, inputs.prompt_ids, inputs.problems,
               inputs.eval_sets, evals,
               start_step, cfg.head_chunk if checkpointing else 0,
               tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, streak)


# ---- sample -------------------------------------------------------------------------------------

def prompt_batch(step: int, num_problems: int, batch_prompts: int, seed: int) -> list[int]:
    """Indices of the B training problems of a step (0-based). Epochs are reshuffled with a generator
    seeded by (seed, epoch), so a step's batch is a pure function of the step: resuming needs no state."""
    indices, perms = [], {}
    for i in range(step * batch_prompts, (step + 1) * batch_prompts):
        epoch, j = divmod(i, num_problems)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(num_problems, generator=g).tolist()
        indices.append(perms[epoch][j])
    return indices


def sample_rollouts(run: Run, cfg, prompts: list[list[int]], step: int) -> sample.Rollouts:
    """sample.generate with the run's settings and generator; a policy that has diverged (non-finite
    logits) stops the run with a message that names the step and the likely cause."""
    diverged = (f"step {step + 1}: the policy produced non-finite logits while sampling. The model has "
                f"diverged; the likely cause is a too-high learning rate (lr={cfg.lr}): NSR alone at a high "
                f"lr keeps pushing the sampled tokens' logits down without bound. Lower --lr or use "
                f"w-reinforce; the last good checkpoint (if any) is in {cfg.out_dir}.")
    try:
        rollouts = sample.generate(run.policy.model, prompts, cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_p=cfg.top_p, generator=run.generator, chunk_size=cfg.chunk_size)
    except RuntimeError as e:
        # non-finite logits normally come back as NaN log-probs (checked just below); an error raised
        # while the weights are non-finite is divergence too (e.g. torch.multinomial's "probability
        # tensor ..." if a student swaps the sampler back); anything else (out of memory) is re-raised
        if "probability tensor" in str(e) or not precision.all_finite(run.policy.model):
            raise RuntimeError(diverged) from e
        raise
    if not all(math.isfinite(v) for row in rollouts.logprobs for v in row):
        raise RuntimeError(diverged)
    return rollouts


def training_logprobs(run: Run, cfg, prompts: list[list[int]], rollouts: sample.Rollouts,
                      row_groups: list[list[int]]) -> list[list[float]]:
    """log pi_old(y_t) of the rows in row_groups by the policy's TRAINING forward, under no_grad and before any
    update (the official code's compute_log_prob): each group micro-batched exactly as nsr.minibatch_backward
    will batch it, so the first mini-batch's ratio pi_theta / pi_old is exactly 1 in every precision. The
    sampler's log-probs differ in bf16 (another code path) and under top-p (a truncated distribution).
    Rows in no group keep the sampler's values (no loss reads them). Returns one list per row of rollouts."""
    out = list(rollouts.logprobs)
    device = next(run.policy.model.parameters()).device
    with torch.no_grad():
        for rows in row_groups:
            for part, input_ids, attn, pos, mask in sample.micro_batches(
                    [prompts[i] for i in rows], [rollouts.tokens[i] for i in rows], cfg.micro_batch_size, device,
                    run.pad_id):
                logp, _ = sample.response_logprobs(run.policy.model, input_ids, attn, pos, mask.shape[1],
                                                   cfg.temperature, head_chunk=run.head_chunk)
                for i, row in zip(rows[part], logp.float().tolist()):
                    out[i] = row[:len(rollouts.tokens[i])]
    return out


# ---- log ----------------------------------------------------------------------------------------

@dataclass
class StepStats:
    """What the update of one step did (nsr.rl_step fills it; step_metrics turns it into the log line)."""
    losses: list = field(default_factory=list)        # each optimizer step's loss
    grad_norms: list = field(default_factory=list)    # each optimizer step's gradient norm (before clipping)
    trained: int = 0                                  # samples that got a gradient
    updates: int = 0                                  # optimizer steps
    skipped: bool = False                             # a non-finite loss or gradient: the rest was dropped
    critic: list = field(default_factory=list)        # ppo: (value loss, grad norm) of each critic step
    clip_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(4))   # tokens with w > 0, of them
                                                      # clipped; tokens with w < 0, of them clipped (count_clipped)


def count_clipped(stats: StepStats, weights: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor) -> None:
    """Add one micro-batch's tokens, by the sign of their weight, and those whose gradient the clip zeroed
    (nsr.policy_loss's `clipped`). Kept as a tensor: no device sync until the step is logged."""
    w = weights if weights.dim() == 2 else weights[:, None].expand_as(mask)     # (m, R)
    pos, neg = (w > 0) & (mask > 0), (w < 0) & (mask > 0)
    counts = torch.stack([pos.sum(), (pos & clipped).sum(), neg.sum(), (neg & clipped).sum()]).float()
    stats.clip_counts = stats.clip_counts.to(counts.device) + counts


def step_metrics(step: int, cfg, rewards, true_rewards, rollouts, stats: StepStats, targets, seconds: tuple) -> dict:
    """One JSON line per step with fixed keys (docs/training.md explains each one). rewards: those trained
    on; true_rewards: the verifier's (the same unless --reward random); targets: ppo's."""
    r = torch.tensor(rewards, dtype=torch.float32).view(cfg.batch_prompts, cfg.group_size)
    n_tokens = sum(len(t) for t in rollouts.tokens)
    pos, pos_clipped, neg, neg_clipped = stats.clip_counts.tolist()

    def mean(xs):
        return None if stats.skipped else (sum(xs) / len(xs) if xs else 0.0)

    metrics = {
        "step": step + 1,
        "reward": r.mean().item(),
        "true_reward": sum(true_rewards) / len(true_rewards),
        "all_correct": (r.min(dim=1).values == 1).float().mean().item(),
        "all_wrong": (r.max(dim=1).values == 0).float().mean().item(),
        "response_len": n_tokens / len(rollouts.tokens),
        "truncated": sum(rollouts.truncated) / len(rollouts.tokens),
        "entropy": math.fsum(v for row in rollouts.entropies for v in row) / max(n_tokens, 1),
        "loss": mean(stats.losses),
        "grad_norm": mean(stats.grad_norms),
        "trained_samples": stats.trained,
        "updates": stats.updates,
        "clip_frac_pos": pos_clipped / pos if pos else None,
        "clip_frac_neg": neg_clipped / neg if neg else None,
        "skipped": stats.skipped,
        "sample_s": round(seconds[0], 3),
        "train_s": round(seconds[1], 3),
        "tokens_per_s": round(n_tokens / max(seconds[0] + seconds[1], 1e-9), 1),
    }
    if targets is not None:
        n = max(len(stats.critic), 1)
        metrics.update(value_loss=sum(loss for loss, _ in stats.critic) / n,
                       critic_grad_norm=sum(norm for _, norm in stats.critic) / n,
                       explained_variance=targets.explained_variance, adv_mean=targets.adv_mean)
    return metrics


def append_jsonl(path: pathlib.Path, line: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")


def truncate_jsonl(path: pathlib.Path, last_step: int) -> None:
    """Keep only the lines of steps <= last_step (a resumed run rewrites the lines after its checkpoint).
    A torn last line (the process was killed mid-write) is dropped too: it belongs to a step after the
    checkpoint, which the resumed run writes again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in keep))


# ---- evaluate -----------------------------------------------------------------------------------

def eval_path(run_dir: pathlib.Path, step: int, name: str) -> pathlib.Path:
    """Where the evaluation of eval set `name` at `step` is saved."""
    return run_dir / "eval" / f"step{step:06d}_{name}.json"


# The base's evaluation, shared by the objectives side by side (runs.side_configs starts it afresh): the main
# job trains PSR, then NSR, from one base with one evaluation seed, so the second run's step-0 evaluation is
# the same computation as the first's (same weights, settings and seed; with common random numbers the same
# counts: tested) and is taken from here instead of computed again. Only within one process and one
# --out-dir of runs side by side, keyed by every config field but those side_configs and resolve change.
PER_OBJECTIVE = ("objective", "out_dir", "resume", "kl_coef")
SIDE_BY_SIDE = {"parent": None, "base_evals": {}}


def shared_base_eval_key(run: Run, cfg, name: str) -> str | None:
    """The key of the base's evaluation of eval set `name` when `run` is one of the runs side by side."""
    if str(run.dir.parent.resolve()) != SIDE_BY_SIDE["parent"]:
        return None
    return json.dumps([name, {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PER_OBJECTIVE}],
                      sort_keys=True, default=str)


def evaluate(run: Run, cfg, step: int) -> None:
    """passk.evaluate on every eval set -> run.evals[name][step]; saves eval_path() and one eval.jsonl
    line per set. The same seed at every step: base and trained use the same random numbers."""
    for name, problems in run.eval_sets.items():
        shared = shared_base_eval_key(run, cfg, name) if step == 0 else None
        result = SIDE_BY_SIDE["base_evals"].get(shared)
        if result is not None:                               # the base, evaluated by the run before this one
            passk.save_result(result, eval_path(run.dir, step, name))
        else:
            result = passk.evaluate(run.policy.model, run.tokenizer, problems, cfg.eval_n,
                                    temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                                    max_new_tokens=cfg.eval_max_new_tokens,
                                    seed=cfg.seed, template=cfg.template, chunk_size=cfg.chunk_size,
                                    desc=f"eval {name} @ step {step}", out=eval_path(run.dir, step, name),
                                    model_name=cfg.model, data_name=name)
            if shared is not None:
                SIDE_BY_SIDE["base_evals"][shared] = result
        run.evals[name][step] = result
        ends = passk.passk_curve(result["counts"], cfg.eval_n, [1, cfg.eval_n])
        append_jsonl(run.dir / "eval.jsonl", {
            "step": step, "eval": name, "pass@1": ends[1], f"pass@{cfg.eval_n}": ends[cfg.eval_n],
            "mean_length": result["mean_length"], "mean_entropy": result["mean_entropy"]})


def finish(run: Run, cfg) -> str:
    """Evaluate the end (a run resumed after its last step re-uses the saved results) -> the Pass@k table."""
    for name in run.eval_sets:
        saved = eval_path(run.dir, cfg.steps, name)
        if run.start_step == cfg.steps and saved.is_file():
            run.evals[name][cfg.steps] = passk.load_result(saved)
    if run.eval_sets and any(cfg.steps not in by_step for by_step in run.evals.values()):
        truncate_jsonl(run.dir / "eval.jsonl", cfg.steps - 1)
        evaluate(run, cfg, cfg.steps)
    rows = {}
    for name, by_step in run.evals.items():
        first, last = min(by_step), max(by_step)
        rows[f"{name} base" if first == 0 else f"{name} step {first}"] = by_step[first]
        rows[f"{name} {cfg.objective} step {last}"] = by_step[last]
    return passk.format_table(rows, table_ks(cfg.eval_n)) if rows else ""


def table_ks(n: int) -> list[int]:
    """The k of a table from n samples per problem: powers of two up to n / 4. With n = k the estimate of
    Pass@k is "any of the n right", 0 or 1 per problem; n >= 4k keeps its variance small (issue 30)."""
    return passk.default_ks(max(n // 4, 1))


def side_by_side_table(results: dict, n: int) -> str:
    """The main job's table: per eval set, the base (the first objective's evaluation at step 0: every run
    starts from the same base with the same evaluation seed) and each objective's last evaluation, Pass@k
    (%) for k <= n / 4 and H, the mean token entropy of the test samples (nats). results: {objective:
    nsr.train's result}."""
    first = next(iter(results.values()))
    if not first["evals"]:
        return "no evaluation (--eval-n 0)"
    out = []
    for name, by_step in first["evals"].items():
        rows = {"base": by_step[min(by_step)]}
        for objective, result in results.items():
            steps = result["evals"][name]
            rows[f"{objective.upper()} step {max(steps)}"] = steps[max(steps)]
        width = max(len(label) for label in rows)
        rows = {f"{label:<{width}}  H={r['mean_entropy']:.3f}": r for label, r in rows.items()}
        out.append(f"{name}: Pass@k (%) from n = {n} samples per problem; H = test entropy (nats/token)\n"
                   + passk.format_table(rows, table_ks(n)))
    return "\n\n".join(out)


def nonfinite_stop(step: int, streak: int, cfg) -> None:
    """Report a skipped step; stop the run after cfg.max_nonfinite of them in a row."""
    tqdm.write(f"step {step + 1}: non-finite loss or gradient; step skipped ({streak} in a row)")
    if streak >= cfg.max_nonfinite:
        raise RuntimeError(
            f"step {step + 1}: {streak} consecutive steps had a non-finite loss or gradient; stopping. The "
            f"model has likely diverged (lr={cfg.lr}); the last good checkpoint (if any) is in {cfg.out_dir}.")


# ---- checkpoints (resume exactness is tested) -----------------------------------------------------

def trainable_state(t: precision.Trainable) -> dict:
    """What a checkpoint needs beyond save_pretrained: AdamW's state and the fp32 masters (a bf16
    save_pretrained alone would lose what was not yet rounded into the model)."""
    return {"optimizer": t.optimizer.state_dict(),
            "master": None if t.master is t.params else [m.detach().cpu() for m in t.master]}


def load_trainable_state(t: precision.Trainable, state: dict) -> None:
    t.optimizer.load_state_dict(state["optimizer"])
    if state["master"] is not None:
        with torch.no_grad():
            for m, saved in zip(t.master, state["master"]):
                m.copy_(saved)


def save_checkpoint(run: Run, step: int) -> pathlib.Path:
    """Write run.dir/checkpoint-<step> atomically: everything goes to a temporary directory that is
    renamed into place only when complete, then the `latest` pointer is replaced (os.replace is
    atomic), then older checkpoints are removed. A crash at any point leaves a complete checkpoint.
    Holds: the policy (save_pretrained), the tokenizer, critic/ (ppo), trainer_state.pt."""
    if not precision.all_finite(run.policy.model):
        raise RuntimeError(f"step {step}: the model has non-finite weights; refusing to save it "
                           f"(the last checkpoint in {run.dir} stays good)")
    final = run.dir / f"checkpoint-{step:06d}"
    tmp = run.dir / f".tmp-checkpoint-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    run.policy.model.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    if run.critic is not None:
        run.critic.model.save_pretrained(tmp / "critic")
    torch.save({"step": step, "nonfinite_streak": run.nonfinite_streak, **trainable_state(run.policy),
                "critic": trainable_state(run.critic) if run.critic is not None else None,
                "rng": {"sampler": run.generator.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    loading.write_atomic(run.dir / "latest", final.name + "\n")
    for old in run.dir.glob("checkpoint-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def restore(ckpt: pathlib.Path, policy, critic, generator) -> tuple[int, int]:
    """Load a checkpoint's optimizer state, masters and random state -> (its step, the non-finite streak)."""
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    load_trainable_state(policy, state)
    if critic is not None:
        load_trainable_state(critic, state["critic"])
    generator.set_state(state["rng"]["sampler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state.get("nonfinite_streak", 0)


def latest_checkpoint(run_dir: pathlib.Path) -> pathlib.Path | None:
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").is_file() else None
