"""
settings.py -- from the command line to a checked nsr.Config. OPTIONAL READING: nsr.py's Config lists
every field with its comment; this file turns them into flags and checks the values, once.

    parse_config(Config, argv, toy_defaults) -> a Config: every field is a flag (--batch-prompts for
        batch_prompts), with its comment as --help. Precedence: Config defaults < toy_defaults (no
        --model: the main job on the toy world) < --preset (presets.PRESETS) < explicit flags.
    config_problems(cfg, objectives) -> everything wrong with a config, as messages (empty = valid);
    check_config raises them as one UserError.
    UserError: a problem with the user's input; nsr.main prints it in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import pathlib
import re

import torch

import loading
import presets


# A Config field's type annotation -> how a command-line value of it is read (--set / --sweep use it too)
TYPES = {"int": int, "float": float, "str": str, "bool": lambda text: text.lower() in ("1", "true", "yes")}


def reader(annotation: str):
    """How a command-line value of a Config field with this type annotation is read ("int", "float | None",
    ...): TYPES' reader, and for a field that may be None (the official recipe's value) also the text "none"."""
    read = TYPES.get(annotation.split(" | ")[0], str)
    if not annotation.endswith("| None"):
        return read
    return lambda text: None if text.lower() == "none" else read(text)


NORMALIZERS = ("tokens", "micro", "weighted", "constant")   # nsr.loss_normalizer's modes (--normalizer)


class UserError(ValueError):
    """Bad input (a flag, a file, a model path): shown as one clear message and exit status 2, not a traceback."""


def field_help(config_cls) -> dict[str, str]:
    """The comment after each Config field, for --help (read from the source: one place to document)."""
    help_text, name = {}, None
    for line in inspect.getsource(config_cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        more = re.match(r"\s+#\s*(.*)$", line)
        if m:
            name, help_text[m.group(1)] = m.group(1), m.group(2)
        elif more and name and not more.group(1).startswith(("----", "====")):
            help_text[name] += " " + more.group(1)     # a comment continued on the next line
        else:
            name = None
    return help_text


def parse_config(config_cls, argv=None, toy_defaults: dict | None = None):
    """argv -> a config_cls instance (not yet checked: config_problems does that, once, before any work)."""
    parser = argparse.ArgumentParser(
        prog="nsr.py", description="PSR / NSR / W-REINFORCE / REINFORCE / GRPO / PPO with verifiable rewards. "
        "No arguments: the main job on the toy world.", argument_default=argparse.SUPPRESS)
    help_text = field_help(config_cls)
    for f in dataclasses.fields(config_cls):
        flag, h = "--" + f.name.replace("_", "-"), help_text.get(f.name, "")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=h)
        elif f.type == "list":
            parser.add_argument(flag, action="append", metavar="FILE", help=h)
        else:
            parser.add_argument(flag, type=reader(f.type), help=f"{h} (default: {f.default})")
    given = vars(parser.parse_args(argv))
    preset = {}
    if given.get("preset"):
        if given["preset"] not in presets.PRESETS:
            parser.error(f"unknown --preset {given['preset']!r}; choose one of {', '.join(presets.PRESETS)}")
        preset = presets.PRESETS[given["preset"]]
    toy_world = not (given.get("model") or preset.get("model"))
    return config_cls(**{**((toy_defaults or {}) if toy_world else {}), **preset, **given})


def config_problems(cfg, objectives) -> list[str]:
    """Everything wrong with a config, as messages (empty = valid). Checked before any work starts.
    The one place a Config's values are checked: nsr.py, runs.py and reproduce.py all come here."""
    bad = []
    if cfg.objective not in objectives:
        bad.append(f"--objective {cfg.objective!r} is unknown; choose one of {', '.join(objectives)}")
    if cfg.lam < 0:
        bad.append(f"--lam must be >= 0 (weight of correct samples in w-reinforce), got {cfg.lam}")
    if cfg.objective == "grpo" and cfg.group_size < 2:
        bad.append(f"--group-size must be >= 2 for grpo (a group std needs two samples), got {cfg.group_size}")
    return bad + _range_problems(cfg) + _clip_problems(cfg) + _choice_problems(cfg) + _input_problems(cfg)


def _range_problems(cfg) -> list[str]:
    """Numbers outside their range: counts >= 1, sizes >= 0, rates > 0, probabilities in [0, 1]."""
    bad = []
    for name in ("steps", "batch_prompts", "group_size", "max_new_tokens", "chunk_size", "micro_batch_size",
                 "max_nonfinite"):
        if getattr(cfg, name) < 1:
            bad.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("eval_n", "eval_every", "save_every", "grad_clip", "weight_decay", "entropy_coef", "clip_eps",
                 "checkpointing_min_params", "head_chunk", "value_clip", "kl_coef"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            bad.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for name in ("max_prompt_len", "eval_limit", "eval_max_new_tokens", "threads", "mini_batch_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:   # None: no limit / the default
            bad.append(f"--{name.replace('_', '-')} must be >= 1 (or none), got {getattr(cfg, name)}")
    for name in ("lr", "critic_lr"):
        if not getattr(cfg, name) > 0:
            bad.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("gae_gamma", "gae_lam"):
        if not 0 <= getattr(cfg, name) <= 1:
            bad.append(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(cfg, name)}")
    if not 0 <= cfg.random_reward_p <= 1:
        bad.append(f"--random-reward-p must be in [0, 1], got {cfg.random_reward_p}")
    if not 0 < cfg.temperature:
        bad.append(f"--temperature must be > 0 for training (the loss needs a sampling distribution), "
                   f"got {cfg.temperature}")
    for name in ("top_p", "eval_top_p"):
        if not 0 < getattr(cfg, name) <= 1:
            bad.append(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(cfg, name)}")
    if cfg.eval_temperature < 0:
        bad.append(f"--eval-temperature must be >= 0, got {cfg.eval_temperature}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            bad.append(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    return bad


def _clip_problems(cfg) -> list[str]:
    """The clip sides in force (clip_sides): ppo needs one, each in range; the sampler's ratio needs --top-p 1."""
    bad = []
    low, high = clip_sides(cfg)
    if cfg.objective == "ppo" and low == high == 0:
        bad.append("--objective ppo needs clipping: --clip-eps > 0 (the paper: 0.2), or --clip-low / --clip-high")
    if not 0 <= low <= 1:
        bad.append(f"the ratio's lower side (--clip-low, or --clip-eps) must be in [0, 1] (its bound is 1 - clip_low), "
                   f"got {low}")
    if not high >= 0:
        bad.append(f"the ratio's upper side (--clip-high, or --clip-eps) must be >= 0, got {high}")
    if (low > 0 or high > 0 or cfg.mini_batch_size is not None) and cfg.top_p < 1 and cfg.old_logprobs == "sampler":
        bad.append("--old-logprobs sampler with clipping or mini-batches needs --top-p 1: the sampler's log-probs "
                   "are of the top-p truncated distribution (--old-logprobs training recomputes them)")
    return bad


def _choice_problems(cfg) -> list[str]:
    """Text fields outside their list of choices."""
    bad = []
    if cfg.optimizer not in ("adamw", "sgd"):
        bad.append(f"--optimizer must be adamw or sgd, got {cfg.optimizer!r}")
    if cfg.reward not in ("verifier", "random"):
        bad.append(f"--reward must be verifier or random, got {cfg.reward!r}")
    if cfg.normalizer not in NORMALIZERS:
        bad.append(f"--normalizer must be one of {', '.join(NORMALIZERS)}, got {cfg.normalizer!r}")
    if cfg.old_logprobs not in ("training", "sampler"):
        bad.append(f"--old-logprobs must be training or sampler, got {cfg.old_logprobs!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        bad.append(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.grad_checkpointing not in ("auto", "on", "off"):
        bad.append(f"--grad-checkpointing must be auto, on or off, got {cfg.grad_checkpointing!r}")
    if cfg.template not in loading.TEMPLATES:
        bad.append(f"--template {cfg.template!r} is unknown; choose one of {', '.join(loading.TEMPLATES)}")
    return bad


def _input_problems(cfg) -> list[str]:
    """Files, the model, the device and --dry-run: what the machine must hold for the config to run."""
    bad = []
    if cfg.train and not pathlib.Path(cfg.train).is_file():
        bad.append(f"--train {cfg.train}: no such file")
    for path in cfg.eval:
        if not pathlib.Path(path).is_file():
            bad.append(f"--eval {path}: no such file")
    if cfg.model and not cfg.train and not cfg.dry_run:
        bad.append("--model is given but --train is not: a real model needs --train FILE.jsonl")
    if cfg.device != "auto" and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        bad.append(f"--device {cfg.device}: CUDA is not available on this machine")
    if cfg.dry_run and not cfg.model:
        bad.append("--dry-run prints the memory plan of a real model: give --model or --preset")
    elif cfg.dry_run and cfg.model not in presets.ARCHITECTURES and \
            not (pathlib.Path(cfg.model) / "config.json").is_file():
        bad.append(f"--dry-run: no architecture numbers for {cfg.model!r}: give a local model directory, "
                   f"or one of {', '.join(presets.ARCHITECTURES)}")
    return bad


def clip_sides(cfg) -> tuple[float, float]:
    """(clip_low, clip_high) in force: each side's own flag, or --clip-eps where it is None."""
    return tuple(cfg.clip_eps if side is None else side for side in (cfg.clip_low, cfg.clip_high))


def check_config(cfg, objectives) -> None:
    """Raise UserError listing everything wrong with cfg (config_problems), or return."""
    problems = config_problems(cfg, objectives)
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))
