"""
loading.py -- what the sampler and the trainer are fed, and where a run's files go. OPTIONAL READING:
nsr.py, passk.py and toy.py call these; none of them changes what a step computes.

    load_model(name_or_dir)                  -> (model, tokenizer), eval mode, every end-of-turn id as EOS
    render_prompt(tokenizer, problem)        -> the prompt string (the paper's templates, below)
    encode_prompts(tokenizer, problems)      -> prompt token ids, the problems kept, the number skipped
    load_problems(path.jsonl)                -> [{"problem", "answer"}], errors name FILE:LINE
    move_aside(path), write_atomic(path, text): make room for new output, write a file whole or not at all

It imports only verifier.py (a missing answer is taken from the solution's last box), so the files import
one way (README: "The files").

Run nothing here directly; this tests it:
    python -m pytest -q test_nsr.py -k "template or prompt or load_problems or load_model"
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import verifier

# =================================================================================================
# MODELS, PROMPTS AND DATA: load a model, render the official prompt templates, read JSONL problems
# =================================================================================================
#
# The paper (and its official code, github.com/TianHongZXY/RLVR-Decomposed: eval.py and
# verl/utils/dataset/rl_dataset.py, `qwen_boxed_prompt`) prompts every model with the Qwen2.5-Math
# evaluation prompt: the system line SYSTEM, then the problem followed by INSTRUCTION, in ChatML. The reward only reads the last \boxed{...} of the
# response, so the instruction matters: without it a model often answers in prose and scores 0.
#
# Templates (`--template`), each rendered to ONE string that ends where the assistant starts writing:
#   "qwen2.5-math"  <|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{problem}{INSTRUCTION}
#                   <|im_end|>\n<|im_start|>assistant\n          (ChatML, Qwen2.5 / Qwen2.5-Math)
#   "qwen3"         the same, then the empty think block "<think>\n\n</think>\n\n": this is exactly
#                   what Qwen3's own chat template appends after "<|im_start|>assistant\n" when it is
#                   called with enable_thinking=False (non-thinking mode); source: "chat_template" in
#                   huggingface.co/Qwen/Qwen3-0.6B/blob/main/tokenizer_config.json. NOTE: the paper's
#                   code (verl/utils/dataset/rl_dataset.py, commented-out Qwen3 line) ends the block
#                   with ONE "\n"; we follow Qwen3's template (two), which is what the model was tuned on.
#   "llama3"        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>
#                   <|start_header_id|>user<|end_header_id|>\n\n{problem}{INSTRUCTION}<|eot_id|>
#                   <|start_header_id|>assistant<|end_header_id|>\n\n   (the Llama 3 header format,
#                   Meta-Llama-3-8B-Instruct's template). Llama 3.1/3.2's templates also write
#                   "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n" at the top of the
#                   system turn, where 3.2 fills in TODAY's date: a prompt that changes with the calendar
#                   breaks reproducibility, so "llama3" leaves both lines out (and "auto" keeps them).
#   "plain"         "{problem}{INSTRUCTION}\n"  (no chat markup at all; for base models without a
#                   chat template, e.g. the toy model if it had none)
#   "auto"          the tokenizer's own chat template when it has one (apply_chat_template with
#                   [system, user] messages and add_generation_prompt=True), else "plain".
# Line breaks above are only for reading; the real strings contain exactly the "\n"s shown.

SYSTEM = "You are a helpful assistant."
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("auto", "plain", "qwen2.5-math", "qwen3", "llama3")
# The special tokens each written-out template needs as single tokens of the vocabulary: a tokenizer
# without them would spell "<|im_start|>" out character by character, a prompt the model never saw.
TEMPLATE_TOKENS = {"qwen2.5-math": ("<|im_start|>", "<|im_end|>"), "qwen3": ("<|im_start|>", "<|im_end|>"),
                   "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}

# Tokens that end an assistant turn in the chat formats above. A base model (Qwen2.5-Math-1.5B has
# eos = <|endoftext|>) prompted in ChatML ends its answer with <|im_end|>, so sampling must stop on
# both; the official Qwen2.5-Math evaluation stops on the same pair. load_model adds those of
# these tokens that exist in the vocabulary to model.generation_config.eos_token_id.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_local(name_or_dir) -> bool:
    """A local model directory (loaded with local_files_only: no network), not a hub name."""
    return pathlib.Path(str(name_or_dir)).is_dir()


def torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Our --dtype names -> a torch dtype: "auto" = bfloat16 on CUDA and float32 on CPU (NOTE: OUR
    "auto", not transformers' "use the checkpoint's dtype"), or "float32" / "bfloat16" / "float16"."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def load_model(name_or_dir, dtype="auto", device=None):
    """Load (model, tokenizer) with AutoModelForCausalLM / AutoTokenizer .from_pretrained.

    name_or_dir: a hub name ("Qwen/Qwen2.5-Math-1.5B") or a local directory (e.g. runs/toy-base-s0 or a
    checkpoint written by train). A local directory is loaded with local_files_only=True, so no
    network access is attempted for it.
    dtype: see torch_dtype ("auto" = bfloat16 on CUDA, float32 on CPU).
    device: default "cuda" when available, else "cpu".
    The model is returned in eval mode; the caller switches to train() when training.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    local = is_local(name_or_dir)
    # transformers 5.x takes `dtype=` (the old `torch_dtype=` is deprecated).
    model = AutoModelForCausalLM.from_pretrained(str(name_or_dir), dtype=torch_dtype(dtype, device),
                                                 local_files_only=local)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir), local_files_only=local)
    model.to(device).eval()

    # Our sampler and loss pad by themselves, but several tokenizer calls (batch encoding, collators)
    # need a pad id to exist; Llama 3 ships none. The eos token is the usual stand-in: padded
    # positions are always masked, so which id fills them does not matter.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    # Stop sampling on every end-of-turn token the vocabulary has (see END_OF_TURN_TOKENS).
    stop_ids = model.generation_config.eos_token_id
    stop_ids = [] if stop_ids is None else [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    if tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    stop_ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    model.generation_config.eos_token_id = sorted(set(stop_ids)) or None
    return model, tokenizer


def render_prompt(tokenizer, problem: str, template: str = "auto") -> str:
    """Render one problem as the prompt string the model continues (see the table above)."""
    user = problem + INSTRUCTION
    if template == "auto":
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
            # enable_thinking=False puts Qwen3 in non-thinking mode (as the paper's Qwen3 runs);
            # templates that do not use the variable ignore it, so it is safe for every model.
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False)
        template = "plain"
    if template == "plain":
        return user + "\n"
    if template in ("qwen2.5-math", "qwen3"):
        # ChatML as written by Qwen2.5's chat template (system given explicitly, so its default
        # system line is not used).
        text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n"
                f"<|im_start|>assistant\n")
        if template == "qwen3":
            text += "<think>\n\n</think>\n\n"
        return text
    if template == "llama3":
        return (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
                f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n")
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def load_problems(path, problem_field: str = "problem", answer_field: str = "answer") -> list[dict]:
    """Read a JSONL file of problems -> [{"problem": str, "answer": str}, ...] in file order.

    One JSON object per line (blank lines are ignored). A record whose `answer_field` is missing or
    empty but that has a MATH-style "solution" gets its answer from the solution's last \\boxed{...}
    (verifier.extract_answer). Errors (malformed JSON, a missing field, an answer that is a list, an
    object, null or true/false: "[2]" is no answer) name the file and the 1-based line number and stop:
    a wrong field name should fail loudly, not train on nothing.

    A record that still has no answer is SKIPPED with a warning naming file:line. NOTE: the MATH
    train split has exactly such records (lines 5342 and 5344 of math_train.jsonl: "answer" is ""
    and the solution ends in an empty \\boxed{}). A problem without a gold answer can never be
    rewarded, so every sample of it would count as wrong -- under NSR that pushes down correct
    reasoning -- so it must not be trained on.
    """

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    problems, unanswered = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg.removesuffix(' at')} at column "
                                 f"{e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if problem_field not in record:
                raise ValueError(f"{path}:{lineno}: missing field {problem_field!r} "
                                 f"(fields present: {', '.join(record) or 'none'})")
            if answer_field not in record and "solution" not in record:
                raise ValueError(f"{path}:{lineno}: missing field {answer_field!r} and no 'solution' "
                                 f"to take it from (fields present: {', '.join(record)})")
            # Answers are compared as strings by the verifier; JSON numbers (27 for "27") too, and a
            # whole float (27.0, as numeric dataset columns export) becomes "27", not "27.0".
            answer = record.get(answer_field)
            if answer_field in record and (answer is None or isinstance(answer, (list, dict, bool))):
                kind = "null" if answer is None else type(answer).__name__
                raise ValueError(f"{path}:{lineno}: field {answer_field!r} must be a string or a number, got {kind} "
                                 f"({json.dumps(answer)[:40]})")
            if isinstance(answer, float) and answer.is_integer():
                answer = int(answer)
            answer = "" if answer is None else str(answer).strip()
            if not answer and "solution" in record:
                answer = (verifier.extract_answer(str(record["solution"])) or "").strip()
            if not answer:
                unanswered.append(lineno)
                continue
            problems.append({"problem": str(record[problem_field]), "answer": answer})
    if unanswered:
        warnings.warn(f"{path}: skipped {len(unanswered)} record(s) without an answer, at line(s) "
                      f"{', '.join(map(str, unanswered))}", stacklevel=2)
    if not problems:
        raise ValueError(f"{path}: no problems (the file is empty or no record has an answer)")
    return problems


def move_aside(path) -> pathlib.Path:
    """Rename a file or directory that is in the way to the first free <path>.1, <path>.2, ... and return
    the new path: the one way this project makes room for new output. Nothing is ever deleted unasked."""
    path = pathlib.Path(path)
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    aside = path.with_name(f"{path.name}.{n}")
    path.rename(aside)
    return aside


def encode_prompts(tokenizer, problems, template: str = "auto", max_prompt_len=None):
    """Render and tokenize problems -> (prompt_ids, kept, n_skipped).

    prompt_ids[i] are the token ids of render_prompt(kept[i]["problem"]); problems whose prompt is
    longer than max_prompt_len tokens are skipped (not truncated: a cut-off problem cannot be solved)
    and counted in n_skipped.
    """
    prompt_ids, kept = [], []
    for problem in problems:
        text = render_prompt(tokenizer, problem["problem"], template)
        # A chat-rendered string already carries its special tokens (Llama's <|begin_of_text|> is in
        # the template), so the tokenizer must not add a second BOS. Plain text gets the tokenizer's
        # usual specials (a BOS for Llama-style tokenizers, nothing for Qwen).
        chat = template != "plain" and not (template == "auto" and not getattr(tokenizer, "chat_template", None))
        ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            continue
        prompt_ids.append(list(ids))
        kept.append(problem)
    return prompt_ids, kept, len(problems) - len(kept)


def write_atomic(path, text: str) -> pathlib.Path:
    """Write text to path through <path>.tmp and os.replace (atomic): an interrupted writer leaves the old
    file or the new one, never half of one. The one atomic write of the project (passk, reproduce, runs)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
