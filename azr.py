"""Absolute Zero (Zhao et al., 2025, arXiv 2505.03335): reinforced self-play reasoning with zero data.

One model plays two roles. As proposer it writes Python tasks of three kinds (deduction: program + input ->
output; abduction: program + output -> input; induction: input/output pairs + message -> program); the
sandboxed executor checks and answers them. As solver it answers those tasks and the executor grades the
answers. Both roles are trained together with Task-Relative REINFORCE++. The contract is ../shared/SPEC.md.

Reading guide (paper -> code, top to bottom):
  prompts, Fig. 4 / App. C ........ R1_TEMPLATE, propose_deduction, propose_abduction, propose_induction,
                                     solve_deduction, solve_abduction, solve_induction
  format reward, Eq. 6 ............. extract_answer, format_ok, solver_format_ok
  task validation, Sec. 3.3.3 ...... check_program, parse_proposal, parse_induction_proposal, validate_proposals
  answer checking, Sec. 3.3.4 ...... grade_answers
  rewards, Eq. 4-6 ................. learnability_reward, proposer_reward, solver_reward
  TRR++, Eq. 8 ..................... trr_advantages, policy_loss, policy_update
  buffers + zero triplet, Sec. 3.3.1 TaskBuffer, ZERO_TRIPLET, seed_buffers
  one step, Algorithm 1 ............ azr_step
  CRUXEval, Sec. 4 ................. evaluate_cruxeval
  CLI .............................. main (train), `azr.py eval`, `azr.py plot`

Usage: python azr.py --model Qwen2.5-3B    |    torchrun --nproc_per_node 8 azr.py ...    |    see README.md
"""
import argparse
import ast
import io
import json
import os
import random
import re
import shutil
import sys
import threading
import time
import tokenize
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from executor import Executor, parse_args, parse_value, values_equal
from kernels import linear_logprobs
from model import Sampler, Transformer, empty_model, load_model, save_model

KINDS = ("deduction", "abduction", "induction")


# ----------------------------------------------------------------------------------------------------------------
# Config: the paper's settings (Table 3) as defaults; every field is a command-line flag.

@dataclass
class Config:
    model: str = field(default="Qwen2.5-Coder-3B", metadata=dict(help=(
        "'tiny', a local HF directory, a hub id or a short name: Qwen2.5[-Coder]-{0.5B,1.5B,3B,7B,14B}, "
        "Qwen3-{0.6B,1.7B,4B,8B}[-Base], Llama-3.1-8B, Llama-3.2-{1B,3B}, some -Instruct (README's model table)")))
    out_dir: str = field(default="runs/azr", metadata=dict(help="run directory: metrics.jsonl, samples, checkpoints"))
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata=dict(help="cuda or cpu", choices=("cuda", "cpu")))
    steps: int = field(default=500, metadata=dict(help="self-play steps (paper: 500)", min=1))
    batch_size: int = field(default=64, metadata=dict(help="prompts per task-role batch (6 batches per step)", min=1))
    tasks: str = field(default="deduction,abduction,induction", metadata=dict(help="task kinds to play (ablation: e.g. 'deduction')"))
    train_proposer: bool = field(default=True, metadata=dict(help="train on proposer responses (ablation: solver only)"))
    n_learnability: int = field(default=8, metadata=dict(help="N solver samples that estimate a proposal's solve rate (Eq. 4)", min=1))
    k_references: int = field(default=6, metadata=dict(help="K reference snippets shown to the deduction/abduction proposer", min=0))
    n_induction_inputs: int = field(default=10, metadata=dict(help="inputs per induction proposal (half shown, half hidden)", min=2))
    temperature: float = field(default=1.0, metadata=dict(help="sampling temperature for training rollouts", min=0))
    top_p: float = field(default=1.0, metadata=dict(help="nucleus sampling for training rollouts", gt=0, max=1))
    max_prompt_tokens: int = field(default=6144, metadata=dict(help="longer prompts drop references or are skipped", min=1))
    max_response_tokens: int = field(default=8096, metadata=dict(help="generation limit per response", min=1))
    lr: float = field(default=1e-6, metadata=dict(help="AdamW learning rate (constant)", gt=0))
    weight_decay: float = field(default=0.01, metadata=dict(help="AdamW weight decay", min=0))
    grad_clip: float = field(default=1.0, metadata=dict(help="global gradient-norm clip", gt=0))
    clip_ratio: float = field(default=0.2, metadata=dict(help="PPO ratio clip", gt=0))
    entropy_coef: float = field(default=0.001, metadata=dict(help="entropy bonus coefficient", min=0))
    trivial_proposal_reward: float = field(default=0.0, metadata=dict(help="proposer reward when the solve rate is 0 or 1 (paper 0, upstream -0.5)"))
    micro_batch_tokens: int = field(default=16384, metadata=dict(help="padded tokens per training micro-batch", min=1))
    grad_checkpoint: bool = field(default=True, metadata=dict(help="recompute decoder blocks in backward to save memory"))
    exec_timeout: float = field(default=10.0, metadata=dict(help="executor wall-clock limit per program, seconds", gt=0))
    exec_workers: int = field(default=os.cpu_count() or 1, metadata=dict(help="executor worker processes", min=1))
    exec_unsafe: bool = field(default=False, metadata=dict(help="let a root trainer run tasks as root without capabilities where the executor cannot give them an unprivileged uid (it refuses otherwise)"))
    max_output_chars: int = field(default=400, metadata=dict(help="proposals whose output repr is longer are invalid", min=1))
    buffer_cap: int = field(default=16384, metadata=dict(help="FIFO cap per task buffer", min=1))
    seed_file: str = field(default="", metadata=dict(help="upstream *_seed_io.jsonl; its *_code_f_ twin is read too if present"))
    seed_size: int = field(default=256, metadata=dict(help="seeding target per buffer pool when no --seed-file (0: zero triplet only)", min=0))
    seed_rounds: int = field(default=64, metadata=dict(help="give up seeding after this many proposal rounds", min=1))
    seed: int = field(default=0, metadata=dict(help="random seed (buffers, sampling)"))
    save_every: int = field(default=10, metadata=dict(help="checkpoint every N steps (0: only at the end)", min=0))
    keep_checkpoints: int = field(default=3, metadata=dict(help="keep the newest N checkpoints (0: keep all; a 7B one is ~90 GB)", min=0))
    resume: str = field(default="", metadata=dict(help="checkpoint directory to resume from, or 'auto' for the latest in out_dir"))
    eval_every: int = field(default=0, metadata=dict(help="CRUXEval-I/O every N steps (0: never)", min=0))
    eval_data: str = field(default="", metadata=dict(help="cruxeval.jsonl for --eval-every"))
    eval_limit: int = field(default=0, metadata=dict(help="evaluate on the first N items only (0: all)", min=0))
    log_samples: int = field(default=2, metadata=dict(help="proposer and solver samples per task-role written to samples.txt each step", min=0))
    kv_cache_gib: float = field(default=0.0, metadata=dict(help="sampler KV block pool per GPU, GiB (0: the free memory after loading, less an estimate of what the update needs)", min=0))
    peak_tflops: float = field(default=0.0, metadata=dict(help="accelerator bf16 peak for MFU (0: guess from the device name)", min=0))
    dist_timeout: float = field(default=120.0, metadata=dict(help="minutes a rank may wait in a collective under torchrun (rank 0 alone writes checkpoints and runs the executor)", gt=0))

    @property
    def kinds(self):
        return tuple(k.strip() for k in self.tasks.split(",") if k.strip())


def parse_config(argv, prog="azr.py") -> Config:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"],
                                choices=f.metadata.get("choices"))
    cfg = Config(**vars(parser.parse_args(argv)))
    check_ranges(cfg, parser.error)
    if not cfg.kinds or set(cfg.kinds) - set(KINDS):
        parser.error(f"--tasks must be a comma list of {', '.join(KINDS)}; got {cfg.tasks!r}")
    if cfg.eval_every and not Path(cfg.eval_data).is_file():
        parser.error(f"--eval-every needs --eval-data PATH to cruxeval.jsonl; got {cfg.eval_data!r}")
    if cfg.seed_file and not Path(cfg.seed_file).is_file():
        parser.error(f"--seed-file {cfg.seed_file} not found; pass a *_seed_io.jsonl file or omit the flag")
    check_device(cfg.device, parser.error)
    # malformed records end the run now, not after the model has loaded
    if cfg.eval_every:
        read_jsonl(cfg.eval_data, CRUXEVAL_FIELDS)
    if cfg.seed_file:
        read_jsonl(cfg.seed_file, SEED_FIELDS)
        if seed_twin(cfg.seed_file):
            read_jsonl(seed_twin(cfg.seed_file), SEED_F_FIELDS)
    return cfg


def check_ranges(cfg, error):
    """Every numeric flag against the bounds in its field's metadata (min: >=, gt: >, max: <=), before any work."""
    for f in fields(cfg):
        value, meta, flag = getattr(cfg, f.name), f.metadata, "--" + f.name.replace("_", "-")
        for key, ok, words in (("min", lambda v, b: v >= b, "at least"), ("gt", lambda v, b: v > b, "above"),
                               ("max", lambda v, b: v <= b, "at most")):
            if key in meta and not ok(value, meta[key]):
                error(f"{flag} must be {words} {meta[key]}, got {value}")


def check_device(device, error):
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        error(f"--device cuda, but {why} (torch {torch.__version__}); use --device cpu")


# ----------------------------------------------------------------------------------------------------------------
# Prompts (paper Fig. 4 and App. C; the task texts are our own words, SPEC section 2).

# The DeepSeek-R1-Zero instruction, verbatim: evaluation tooling matches this exact string.
R1_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {}\nAssistant: <think>")

BANNED_MODULES = frozenset("""logging random multiprocessing pebble subprocess threading datetime time hashlib hmac
    bcrypt calendar os sys shutil socket ctypes importlib signal resource""".split())
BANNED_CALLS = frozenset("input open exec eval compile __import__ breakpoint exit quit".split())

CODE_RULES = f"""- Define a function named `f` that takes at least one argument and returns a value.
- Put imports and helper classes at the top; helper functions may also be nested inside `f`.
- It must be deterministic: no randomness, no date or time, no file or network access, no printing, no state
  outside the function.
- Do not import any of: {', '.join(sorted(BANNED_MODULES))}; do not call {', '.join(sorted(BANNED_CALLS))}.
- It must finish within {{timeout:g}} seconds."""

INPUT_RULES = """- Write the input exactly as the arguments between the parentheses of a call `f(...)`: `'John', {'age': 20}`
  passes two arguments. Use literal values only (numbers, strings, lists, tuples, dicts, sets)."""

PROPOSE_IO = """## Task: invent a Python program `f` and one input for it

You are writing a puzzle for another reasoner. {goal}

The program:
{code_rules}
- Make it demand real reasoning: state that changes over several steps, loops, branches, several stages of logic.
- Make it clearly different from every reference program below.

The input:
{input_rules}

Inside <answer> </answer>, give exactly two fenced blocks:
```python
def f(...):
    ...
```
```input
<arguments>
```

### Reference programs, with an input and the output it gives
{references}"""

PROPOSE_GOALS = dict(
    deduction="The reasoner will see your program and your input and must predict the output, so choose both so "
              "that the output is hard to work out.",
    abduction="The reasoner will see your program and the output of your input and must find an input that gives "
              "that output, so choose both so that the input is hard to recover.")

PROPOSE_INDUCTION = """## Task: choose inputs and a message that reveal a hidden program

Below is a Python function `f`. Another reasoner will see half of the inputs you choose, the outputs `f` returns
for them, and your message, and must then write `f` itself; the other half of your inputs are kept back to check
the program it writes.

- Write {n} different inputs, each in its own ```input block.
{input_rules}
- Choose inputs that together pin down what `f` does: typical cases, edge cases, cases that tell plausible
  alternatives apart.
- Write one ```message block: a short hint that helps infer the function without quoting its code.

```python
{program}
```
f(<|YOUR INPUT WILL BE PLUGGED HERE|>)"""

SOLVE_DEDUCTION = """## Task: predict the output

Work out, step by step, what the Python function `f` below returns for the given input. Give the returned value
as a Python literal inside a ```output block (quote strings; a tuple if several values are returned).

```python
{program}
```
```input
{input}
```"""

SOLVE_ABDUCTION = """## Task: find an input

Find arguments for which the Python function `f` below returns exactly the given output; any such input counts.
Give them inside a ```input block, written as the arguments between the parentheses of a call `f(...)`, with
literal values only.

```python
{program}
```
```output
{output}
```"""

SOLVE_INDUCTION = """## Task: write the program

Infer the Python function `f` from the input/output examples and the message below, then write it in one
```python block. It will be checked on further inputs that are not shown here.
{code_rules}

{pairs}
```message
{message}
```"""


def fence(lang, text):
    return f"```{lang}\n{text}\n```"


def propose_io(kind, references, cfg):
    refs = "\n".join(f"<snippet_{k}>\n{fence('python', r['program'])}\n{fence('input', r['input'])}\n"
                     f"{fence('output', r['output'])}\n</snippet_{k}>" for k, r in enumerate(references))
    return PROPOSE_IO.format(goal=PROPOSE_GOALS[kind], code_rules=CODE_RULES.format(timeout=cfg.exec_timeout),
                             input_rules=INPUT_RULES, references=refs)


def propose_deduction(references, cfg):
    return propose_io("deduction", references, cfg)


def propose_abduction(references, cfg):
    return propose_io("abduction", references, cfg)


def propose_induction(program, cfg):
    return PROPOSE_INDUCTION.format(n=cfg.n_induction_inputs, input_rules=INPUT_RULES, program=program)


PROPOSE_PROMPT = dict(deduction=propose_deduction, abduction=propose_abduction, induction=propose_induction)


def solve_deduction(task, cfg):
    return SOLVE_DEDUCTION.format(program=task["program"], input=task["input"])


def solve_abduction(task, cfg):
    return SOLVE_ABDUCTION.format(program=task["program"], output=task["output"])


def solve_induction(task, cfg):
    """The solver's program must meet the proposer's code rules (SPEC 2), time limit included."""
    half = len(task["inputs"]) // 2
    pairs = "\n".join(f"{fence(f'input_{k}', i)}\n{fence(f'output_{k}', o)}"
                      for k, (i, o) in enumerate(zip(task["inputs"][:half], task["outputs"][:half])))
    return SOLVE_INDUCTION.format(code_rules=CODE_RULES.format(timeout=cfg.exec_timeout), pairs=pairs,
                                  message=task["message"])


SOLVE_PROMPT = dict(deduction=solve_deduction, abduction=solve_abduction, induction=solve_induction)


# ----------------------------------------------------------------------------------------------------------------
# Answers and format (Eq. 6): the prompt ends in "<think>", so the model's text continues inside the think block.

FORMAT_RE = re.compile(r"(?s)<think>.*?</think>\s*<answer>.*?</answer>")


def format_ok(response):
    return FORMAT_RE.match("<think>" + response) is not None


def extract_answer(response):
    """Text between the last <answer> and the next </answer>, or to the end when no </answer> follows (as
    upstream: it matters where no format check follows, i.e. learnability grading and proposal parsing; the
    rewards that need the format still apply format_ok). None when there is no <answer>."""
    start = response.rfind("<answer>")
    if start < 0:
        return None
    end = response.find("</answer>", start)
    return response[start + len("<answer>"):end if end >= 0 else None]


BLOCK_RE = re.compile(r"```([\w-]*)[ \t]*\n(.*?)```", re.S)


def fenced_blocks(text, lang):
    """Contents of ```lang blocks, in order. lang='python' also takes untagged blocks (SPEC 3). Blocks are read
    left to right first, so the closing fence of one block never opens another."""
    tags = ("", "python", "python3", "py") if lang == "python" else (lang,)
    return [body.strip("\n") for tag, body in BLOCK_RE.findall(text or "") if tag.lower() in tags]


# ----------------------------------------------------------------------------------------------------------------
# Proposal validation (Sec. 3.3.3, SPEC 3). The AST rules here are a quality filter; the sandbox is the boundary.

class Invalid(ValueError):
    """A proposal or answer that breaks a rule; the message names the rule."""


def parse_program(code):
    """SPEC rule 2 on the AST: the program parses and imports or calls nothing banned."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise Invalid(f"program does not parse: {type(e).__name__}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if BANNED_MODULES & {part for name in names for part in name.split(".")}:
                raise Invalid(f"banned import in line {node.lineno}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BANNED_CALLS:
            raise Invalid(f"banned call {node.func.id}() in line {node.lineno}")
    return tree


def check_solver_program(code, task_program):
    """An induction answer -> the program to run. The solver's code meets the proposer's rule 2, as its prompt
    says (SPEC 2; upstream ran banned imports), and defines a top-level `f` itself; the task program's top-level
    imports are put in front of it, as upstream does, so a solution may use `math` the way the hidden f did."""
    tree = parse_program(code)
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "f" for n in tree.body):
        raise Invalid("the program defines no top-level function f")
    imports = [ast.get_source_segment(task_program, n) for n in ast.parse(task_program).body
               if isinstance(n, (ast.Import, ast.ImportFrom))]
    return "".join(line + "\n" for line in imports) + code


def check_program(code, strip=False):
    """SPEC rules 1-2 for a proposal: parses, defines a top-level function (the first one becomes `f`), no banned
    import or call. strip=True (seeding only) also drops comments and top-level statements other than
    imports/defs/classes."""
    tree = parse_program(code)
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not defs:
        raise Invalid("program defines no top-level function")
    entry = defs[0].name
    bound = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    bound |= {(a.asname or a.name).split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
              for a in n.names}
    if entry != "f" and "f" in bound:
        raise Invalid("the first function is not f but another top-level f exists")
    if strip:
        tree.body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))]
        code = ast.unparse(tree)
    return code if entry == "f" else rename_function(code, entry, "f")


def rename_function(code, old, new):
    """Rename a function and its call sites token by token, so comments (a proposer->solver channel that the paper
    found useful, App. D) survive; attribute names like `obj.old` are left alone."""
    lines = code.splitlines(keepends=True)
    edits, prev = [], None
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.NAME and tok.string == old and not (prev and prev.string == "."):
            edits.append(tok.start)
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            prev = tok
    for row, col in reversed(edits):
        line = lines[row - 1]
        lines[row - 1] = line[:col] + new + line[col + len(old):]
    return "".join(lines)


def parse_proposal(text, strip=False):
    """Deduction/abduction proposal -> (program, input) per SPEC 3: first python block, first input block."""
    programs, inputs = fenced_blocks(text, "python"), fenced_blocks(text, "input")
    if not programs or not inputs:
        raise Invalid("needs a ```python block and an ```input block")
    program = check_program(programs[0], strip=strip)
    parse_args(inputs[0].strip())  # rule 3: safe value expressions only (raises ValueError)
    return program, inputs[0].strip()


def parse_induction_proposal(text, n_inputs):
    """Induction proposal -> (inputs, message): the last n input blocks, pairwise distinct, and a message."""
    inputs, messages = fenced_blocks(text, "input"), fenced_blocks(text, "message")
    if len(inputs) < n_inputs or not messages or not messages[0].strip():
        raise Invalid(f"needs {n_inputs} ```input blocks and a ```message block")
    inputs = [i.strip() for i in inputs[-n_inputs:]]
    values = [parse_args(i) for i in inputs]
    if any(values_equal(a, b) for k, a in enumerate(values) for b in values[k + 1:]):
        raise Invalid("inputs are not pairwise distinct")
    return inputs, messages[0].strip()


def validate_proposals(executor, jobs):
    """Rules 4-5 for many proposals at once. jobs: list of (program, [input, ...]); all inputs of one program run
    in one sandboxed child (an induction proposal's 10). Returns per job the list of output reprs, or None when any
    input fails to run, repeats differently in the second run, or is too long."""
    return [[r.value for r in rs] if all(r.status == "ok" for r in rs) else None
            for rs in executor.run_batch(jobs, check_determinism=True)]


# ----------------------------------------------------------------------------------------------------------------
# Grading solver answers (Sec. 3.3.4, SPEC 4): parsed values, type-aware equality, model text never executed here.

def safe_value(text):
    try:
        return True, parse_value(text)
    except (ValueError, RecursionError, MemoryError):
        return False, None


def grade_answers(executor, kind_tasks_answers):
    """[(kind, task, answer_text_or_None)] -> [bool]. Deduction compares values here; abduction runs f on the
    proposed input, induction runs the proposed f on the hidden inputs, both in the sandbox."""
    verdicts, jobs, owners = [], [], []
    for n, (kind, task, answer) in enumerate(kind_tasks_answers):
        verdicts.append(False)
        if answer is None:
            continue
        if kind == "deduction":
            blocks = fenced_blocks(answer, "output")
            ok, value = safe_value((blocks[-1] if blocks else answer).strip())
            verdicts[n] = ok and values_equal(value, parse_value(task["output"]))
        elif kind == "abduction":
            blocks = fenced_blocks(answer, "input")
            text = (blocks[-1] if blocks else answer).strip()
            try:
                parse_args(text)  # so `4) or (True` is rejected before it can reach f(...)
            except (ValueError, RecursionError, MemoryError):
                continue
            jobs.append((task["program"], text))
            owners.append((n, task["output"]))
        else:
            blocks = fenced_blocks(answer, "python")
            try:
                program = check_solver_program(blocks[-1], task["program"]) if blocks else None
            except Invalid:
                program = None
            if program is None:
                continue
            half = len(task["inputs"]) // 2  # the hidden pairs, all in one sandboxed child
            jobs.append((program, task["inputs"][half:]))
            owners.append((n, task["outputs"][half:]))
    for (n, gold), result in zip(owners, executor.run_batch(jobs) if jobs else []):
        pairs = zip(result, gold) if isinstance(result, list) else [(result, gold)]
        verdicts[n] = all(r.status == "ok" and values_equal(parse_value(r.value), parse_value(o)) for r, o in pairs)
    return verdicts


# ----------------------------------------------------------------------------------------------------------------
# Rewards (Eq. 4-6, SPEC 5).

def learnability_reward(solve_rate, trivial=0.0):
    """Eq. 4: a task is worth proposing when the solver sometimes, but not always, solves it."""
    return 1.0 - solve_rate if 0.0 < solve_rate < 1.0 else trivial


def proposer_reward(valid, formatted, solve_rate, trivial=0.0):
    """Eq. 6 for the proposer: -1 for an invalid proposal or a broken format, else the learnability reward."""
    return learnability_reward(solve_rate, trivial) if valid and formatted else -1.0


def solver_reward(formatted, correct):
    """Eq. 5-6 for the solver: 1 correct, -0.5 well-formatted but wrong, -1 broken format."""
    return -1.0 if not formatted else (1.0 if correct else -0.5)


def solver_format_ok(kind, response):
    """The format half of Eq. 6 for a solver answer: the R1 format, and for induction a python block inside the
    answer (upstream: no parsable function is a format failure, -1, not a wrong answer)."""
    return format_ok(response) and (kind != "induction" or bool(fenced_blocks(extract_answer(response), "python")))


# ----------------------------------------------------------------------------------------------------------------
# Task-Relative REINFORCE++ and the loss (Eq. 8, SPEC 6).

def trr_advantages(rewards):
    """Eq. 8: normalise the rewards of one task-role batch by that batch's own mean and std (population std)."""
    r = torch.tensor(rewards, dtype=torch.float64)
    if len(r) < 2:
        return [0.0] * len(r)
    return ((r - r.mean()) / (r.std(unbiased=False) + 1e-6)).tolist()


def policy_loss(logp, logp_old, advantages, entropy, clip_ratio, entropy_coef):
    """Per-token PPO-clip surrogate minus the entropy bonus, summed; the caller divides by the step's token count
    (global token-mean). With one update on fresh samples the ratio is 1 up to the rounding difference between
    the sampler's and the trainer's forward, so the clip should rarely act: policy_update measures how often."""
    ratio = torch.exp(logp - logp_old)
    surrogate = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_ratio, 1 + clip_ratio))
    return (surrogate - entropy_coef * entropy).sum()


class TokenLogprobs(nn.Module):
    """The trainer's forward: log pi(token) and entropy at every response token, through the fused kernel, so the
    [tokens, vocab] logits never exist. Wrapping the model lets FSDP2 gather the LM head inside a forward."""

    def __init__(self, model, vocab_size):
        super().__init__()
        self.model, self.vocab_size = model, vocab_size

    def forward(self, ids, response_mask, targets, temperature):
        hidden, weight = self.model(ids)[response_mask], self.model.lm_head.weight
        # Under autocast the residual stream stays fp32; run the vocabulary matmul in bf16 like the sampler did.
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
        return linear_logprobs(hidden.to(dtype), weight.to(dtype), targets, temperature, self.vocab_size)


@dataclass
class Rollout:
    key: str                 # task-role batch, e.g. "propose_deduction"
    prompt: list
    tokens: list
    logprobs: list           # the sampler's log pi_old of each token
    text: str = ""
    reward: float = 0.0
    advantage: float = 0.0
    finish_reason: str = "stop"  # "length" when the response hit --max-response-tokens


def micro_batches(rollouts, max_tokens):
    """Group rollouts of similar length so that padded micro-batches hold at most max_tokens tokens."""
    batch, longest = [], 0
    for r in sorted(rollouts, key=lambda r: len(r.prompt) + len(r.tokens)):
        n = len(r.prompt) + len(r.tokens)
        if batch and max(longest, n) * (len(batch) + 1) > max_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(r)
        longest = max(longest, n)
    if batch:
        yield batch


def policy_update(policy, optimizer, rollouts, cfg, world=(0, 1)):
    """One optimizer step on all rollouts of a step. Each rank takes rollouts[rank::size]; the loss is the mean
    over every response token of the step on all ranks (SPEC 6), which DP gradient averaging then preserves."""
    rank, size = world
    n_tokens = sum(len(r.tokens) for r in rollouts)
    device = next(policy.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and size == 1 else nullcontext()
    batches = list(micro_batches([r for r in rollouts[rank::size] if r.tokens], cfg.micro_batch_tokens))
    # FSDP2 gathers weights collectively in every forward, so all ranks run as many micro-batches as the busiest;
    # the extra ones are a one-token dummy whose loss is multiplied by zero.
    n_batches = int(all_reduce(len(batches), size, op="max"))
    dummy = [Rollout("", [0], [0], [0.0])]
    stats = dict(loss=0.0, entropy=0.0, clipped=0.0, abs_log_ratio=0.0)
    max_log_ratio = 0.0
    for k in range(n_batches):
        batch = batches[k] if k < len(batches) else dummy
        width = max(len(r.prompt) + len(r.tokens) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for b, r in enumerate(batch):
            seq = r.prompt + r.tokens
            ids[b, :len(seq)] = torch.tensor(seq)
            mask[b, len(r.prompt) - 1: len(seq) - 1] = True  # position t predicts token t + 1
        targets = torch.tensor([t for r in batch for t in r.tokens], device=device)
        old = torch.tensor([x for r in batch for x in r.logprobs], device=device)
        adv = torch.tensor([r.advantage for r in batch for _ in r.tokens], device=device)
        with autocast:
            logp, entropy = policy(ids.to(device), mask.to(device), targets, cfg.temperature)
        scale = size / max(n_tokens, 1) if batch is not dummy else 0.0
        loss = policy_loss(logp, old, adv, entropy, cfg.clip_ratio, cfg.entropy_coef) * scale
        loss.backward()
        stats["loss"] += loss.item() / size
        if batch is not dummy:
            # Training health: how far the trainer's logprobs are from the sampler's (bf16 copy on GPUs) and on
            # how many tokens the PPO clip takes the gradient away (|ratio - 1| > clip).
            log_ratio = logp.detach() - old
            stats["entropy"] += entropy.sum().item()
            stats["abs_log_ratio"] += log_ratio.abs().sum().item()
            stats["clipped"] += ((log_ratio.exp() - 1).abs() > cfg.clip_ratio).sum().item()
            max_log_ratio = max(max_log_ratio, log_ratio.abs().max().item())
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # gradients must not hold memory through the next rollouts
    stats = {k: all_reduce(v, size) for k, v in stats.items()}
    for k in ("entropy", "clipped", "abs_log_ratio"):
        stats[k] /= max(n_tokens, 1)
    stats["clip_fraction"] = stats.pop("clipped")
    stats["max_abs_log_ratio"] = all_reduce(max_log_ratio, size, op="max")
    stats["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Buffers (Sec. 3.3.1, SPEC 7).

ZERO_TRIPLET = dict(program="def f(a):\n    return a", input='"Hello world"', output="'Hello world'")


class TaskBuffer:
    """FIFO buffer of validated tasks with exact-duplicate rejection. Oldest tasks leave first once full."""

    def __init__(self, cap):
        self.cap, self.items, self.keys = cap, deque(), set()

    @staticmethod
    def key(task):
        return json.dumps([task["program"], task.get("input", task.get("inputs"))])

    def add(self, task):
        k = self.key(task)
        if k in self.keys:
            return False
        self.items.append(task)
        self.keys.add(k)
        if len(self.items) > self.cap:
            self.keys.discard(self.key(self.items.popleft()))
        return True

    def sample(self, rng, k):
        """Up to k distinct tasks, uniformly (proposer references)."""
        return rng.sample(list(self.items), min(k, len(self.items)))

    def fill(self, rng, k):
        """Exactly k tasks, uniformly; with replacement only while the buffer holds fewer than k (solver batches)."""
        items = list(self.items)
        return rng.sample(items, k) if len(items) >= k else rng.choices(items, k=k)

    def __len__(self):
        return len(self.items)


def new_buffers(cfg):
    buffers = {kind: TaskBuffer(cfg.buffer_cap) for kind in KINDS}
    buffers["deduction"].add(dict(ZERO_TRIPLET))
    buffers["abduction"].add(dict(ZERO_TRIPLET))
    return buffers


def zero_induction(executor, cfg):
    """The induction buffer's zero entry: the identity program on a few varied inputs (as upstream)."""
    inputs = ['"Hello world"', "1", "dict(a=1, b=2)", "(1.1, 1.2, 1.3)", '"[[1, 0, 0], [0, 0, 0]]"',
              "1001101100010001", "[1, 2]", "'abc'", "{3, 4}", "-7.5"][:cfg.n_induction_inputs]
    outputs = validate_proposals(executor, [(ZERO_TRIPLET["program"], inputs)])[0]
    return dict(program=ZERO_TRIPLET["program"], inputs=inputs, outputs=outputs,
                message="Write a function that returns whatever you input")


SEED_FIELDS, SEED_F_FIELDS = ("snippet", "input"), ("snippet", "inputs", "message")
CRUXEVAL_FIELDS = ("code", "input", "output", "id")


def read_jsonl(path, required=()):
    """JSON objects, one per line. A malformed record ends the run with one line naming the file and line."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise SystemExit(f"error: {path} line {n} is not JSON ({str(e).splitlines()[0]}); one JSON object per line")
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise SystemExit(f"error: {path} line {n} lacks {', '.join(map(repr, missing))}; records need "
                             f"{', '.join(required)}")
        rows.append(row)
    return rows


def seed_twin(path):
    """Upstream's induction seeds sit beside the deduction/abduction ones: x_seed_io.jsonl -> x_code_f_seed_io.jsonl."""
    twin = Path(path).with_name(Path(path).name.replace("_seed_io", "_code_f_seed_io"))
    return twin if twin.is_file() and twin != Path(path) else None


def load_seed_file(path, executor, cfg, buffers):
    """Fill the buffers from upstream's released seed files. Outputs are recomputed by our executor: upstream
    stored some truncated or non-repr outputs (SPEC 10), and gold answers must come from execution."""
    programs = []
    for row in read_jsonl(path, SEED_FIELDS):
        try:
            programs.append((check_program(row["snippet"]), row["input"]))
        except Invalid:  # e.g. upstream seeds that import os: our rule 2 refuses them
            continue
    for (program, i), outputs in zip(programs, validate_proposals(executor, [(p, [i]) for p, i in programs])):
        if outputs and len(outputs[0]) <= cfg.max_output_chars:
            task = dict(program=program, input=i, output=outputs[0])
            buffers["deduction"].add(task)
            buffers["abduction"].add(dict(task))
    twin = seed_twin(path)
    if twin:
        entries = []
        for row in read_jsonl(twin, SEED_F_FIELDS):
            try:
                inputs = row["inputs"][-cfg.n_induction_inputs:]
                if len(inputs) == cfg.n_induction_inputs:
                    entries.append((check_program(row["snippet"]), inputs, row["message"]))
            except Invalid:
                continue
        for (program, inputs, message), outputs in zip(entries, validate_proposals(executor, [(p, i) for p, i, _ in entries])):
            if outputs and max(map(len, outputs)) <= cfg.max_output_chars:
                buffers["induction"].add(dict(program=program, inputs=inputs, outputs=outputs, message=message))


# ----------------------------------------------------------------------------------------------------------------
# Sampling with the current policy, sharded over ranks.

class Policy:
    """What a step needs from the model: the tokenizer, a sampler over the current weights, and the trainable
    module. On the CPU the sampler runs on the trained fp32 weights themselves. On GPUs it runs on a bf16 copy
    (the master weights are fp32) refreshed in place after every update; under torchrun each rank gathers that
    copy from the FSDP2 shards and samples its share of the prompts (sampling ranks run out of lockstep, FSDP
    forwards cannot). One model.Sampler lives as long as the policy: its KV block pool is allocated once, sized
    to leave room for the update (trainer_reserve_gib) unless --kv-cache-gib says, and its CUDA graphs stay valid
    because the copy is refreshed in place."""

    def __init__(self, model, tokenizer, cfg, world, trains=True):
        self.tokenizer, self.cfg, self.rank, self.size = tokenizer, cfg, *world
        self.stop_ids = stop_token_ids(tokenizer, model.config)
        self.trainable = TokenLogprobs(model, len(tokenizer))
        device = next(model.parameters()).device
        if self.size > 1:
            shard_model(self.trainable, model)
        dtype = model.embed_tokens.weight.dtype
        sample_dtype = torch.bfloat16 if device.type == "cuda" else dtype
        self.sampling_model = model
        if self.size > 1 or dtype != sample_dtype:  # shards, or fp32 master weights on a GPU
            self.sampling_model = empty_model(model.config, device, sample_dtype)
            self.sampling_model.requires_grad_(False)
            self.refresh_sampler()
        try:
            self.sampler = Sampler(self.sampling_model, kv_cache_gib=cfg.kv_cache_gib or None,
                                   reserve_gib=trainer_reserve_gib(model, cfg, self.size) if trains else 0.0)
        except (torch.OutOfMemoryError, ValueError) as e:  # the pool does not fit: say it in the flags' words
            raise SystemExit(f"error: no room for the sampler's KV pool ({e}); set --kv-cache-gib, or lower "
                             f"--micro-batch-tokens (the update's reserve) or the model size") from None

    @torch.no_grad()
    def refresh_sampler(self):
        """Copy the updated weights into the sampling copy, one tensor at a time (a full gather of every tensor
        at once would not fit next to the shards for large models)."""
        if self.sampling_model is self.trainable.model:
            return
        dst = self.sampling_model.state_dict()
        for k, v in self.trainable.model.state_dict().items():
            dst[k].copy_(v.full_tensor() if hasattr(v, "full_tensor") else v)

    def encode(self, text):
        return self.tokenizer(R1_TEMPLATE.format(text), add_special_tokens=False)["input_ids"]

    def sample(self, prompts, n, seed, max_new_tokens=None, temperature=None, progress=None):
        """prompts: list of token lists -> list (len(prompts)*n) of (Sample, text), identical on every rank.
        progress: a bar on rank 0 (default: for 64 samples or more)."""
        cfg = self.cfg
        temperature = cfg.temperature if temperature is None else temperature
        mine = list(range(self.rank, len(prompts), self.size))
        # The answer ends at </answer>, but only after </think>: the R1 instruction itself says "<answer> </answer>"
        # and models repeat it while thinking.
        samples = [] if not mine else self.sampler.generate(
            [prompts[i] for i in mine], n=n, max_new_tokens=max_new_tokens or cfg.max_response_tokens,
            temperature=temperature, top_p=cfg.top_p if temperature > 0 else 1.0, stop_token_ids=self.stop_ids,
            stop_strings=["</answer>"], stop_after="</think>", tokenizer=self.tokenizer,
            seed=(cfg.seed * 1_000_003 + seed) * 64 + self.rank,
            progress=self.rank == 0 and (len(prompts) * n >= 64 if progress is None else progress))
        out = [(i, j, s) for k, i in enumerate(mine) for j, s in enumerate(samples[k * n:(k + 1) * n])]
        if self.size > 1:
            parts = [None] * self.size
            dist.all_gather_object(parts, out)
            out = sorted((x for part in parts for x in part), key=lambda x: (x[0], x[1]))
        return [(s, self.tokenizer.decode(s.tokens, skip_special_tokens=True)) for _, _, s in out]


def trainer_reserve_gib(model, cfg, size):
    """GPU memory the update will take beyond what exists when the sampler's pool is sized (before the first
    step): fp32 gradients and AdamW's two moments (12 bytes per parameter of this rank's shard), and the larger of
    (a) the activations of one --micro-batch-tokens micro-batch (checkpointed blocks keep only their fp32 inputs;
    one block at a time is recomputed, its activations and their gradients) plus the fused kernel's logit-gradient
    chunk, and (b) the foreach AdamW step's temporary (4 bytes per parameter), which exists only once the
    activations are gone; then 2 GiB of slack for the allocator. An estimate: --kv-cache-gib overrides the pool
    size it leads to."""
    c, T = model.config, cfg.micro_batch_tokens
    params = sum(p.numel() for p in model.parameters()) / size
    block = T * (8 * c.hidden_size + 3 * c.intermediate_size) * 4 * 2
    stored = T * c.hidden_size * 4 * c.num_layers if cfg.grad_checkpoint else block * c.num_layers
    total = 12 * params + max(stored + block + 2 ** 28, 4 * params) + 2 * 2 ** 30
    return total / 2 ** 30


def stop_token_ids(tokenizer, config):
    """Generation ends at the tokenizer's eos and pad and at every id of the model config's eos_token_id (an int
    or a list: Llama-3 instruct models end turns with <|eot_id|>, which is not the tokenizer's eos)."""
    eos = config.eos_token_id
    ids = [tokenizer.eos_token_id, tokenizer.pad_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])]
    return sorted({i for i in ids if i is not None})


def shard_model(trainable, model):
    """FSDP2: one shard group per decoder block, the embeddings and head in the root group; bf16 compute with
    fp32 master weights and fp32 gradient reduction (SPEC 6)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if next(model.parameters()).is_cuda else None
    kw = dict(mp_policy=mp) if mp else {}
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(trainable, **kw)


def all_reduce(x, size, op="sum"):
    """A Python number reduced over ranks (NCCL needs the tensor on the GPU)."""
    if size == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dict(sum=dist.ReduceOp.SUM, max=dist.ReduceOp.MAX)[op])
    return t.item()


def from_rank0(value, world):
    """Executor work runs once, on rank 0 (one executor per node); every rank gets rank 0's result."""
    out = [value]
    if world[1] > 1:
        dist.broadcast_object_list(out, src=0)
    return out[0]


# ----------------------------------------------------------------------------------------------------------------
# Small helpers of the step.

def mean(xs):
    return sum(xs) / len(xs) if xs else None


class Background(threading.Thread):
    """Run fn(*args) in a thread (executor work waits on pipes, so the GIL is free for the sampler)."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.value, self.error = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:  # re-raised in the caller's thread
            self.error = e

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


class Timer(dict):
    """Accumulating wall-clock timer: `with timer("phase"): ...`."""

    def __call__(self, name):
        timer = self

        class _Span:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer[name] = timer.get(name, 0.0) + time.perf_counter() - self.t
        return _Span()


# ----------------------------------------------------------------------------------------------------------------
# One self-play step (Algorithm 1).

def build_proposer_prompts(kind, buffers, policy, cfg, rng):
    """Batch of proposer prompts for one kind: K references from the same buffer (deduction/abduction) or one
    program from deduction + abduction (induction). References are dropped until the prompt fits."""
    prompts, pool = [], list(buffers["deduction"].items) + list(buffers["abduction"].items)
    for _ in range(cfg.batch_size):
        if kind == "induction":
            program = rng.choice(pool)["program"]
            ids, meta = policy.encode(propose_induction(program, cfg)), dict(program=program)
        else:
            refs = buffers[kind].sample(rng, cfg.k_references)
            ids = policy.encode(PROPOSE_PROMPT[kind](refs, cfg))
            while len(ids) > cfg.max_prompt_tokens and refs:
                refs = refs[:-1]
                ids = policy.encode(PROPOSE_PROMPT[kind](refs, cfg))
            meta = {}
        if len(ids) <= cfg.max_prompt_tokens:
            prompts.append((ids, meta))
    return prompts


def build_solver_batch(kind, fresh, buffer, policy, cfg, rng):
    """One solver batch (Algorithm 1): this step's valid tasks first, filled from the buffer to --batch-size.
    A task whose prompt exceeds --max-prompt-tokens is replaced by another buffer draw (a few rounds at most).
    Returns ([(kind, task, ids)], number of tasks dropped for length)."""
    items, dropped = [], 0
    candidates = fresh[:cfg.batch_size] + buffer.fill(rng, cfg.batch_size - len(fresh[:cfg.batch_size]))
    for _ in range(4):
        for task in candidates:
            ids = policy.encode(SOLVE_PROMPT[kind](task, cfg))
            if len(ids) <= cfg.max_prompt_tokens:
                items.append((kind, task, ids))
            else:
                dropped += 1
        if len(items) == cfg.batch_size:
            break
        candidates = buffer.fill(rng, cfg.batch_size - len(items))
    return items, dropped


def check_proposals(executor, kinds_texts, cfg, strip=False):
    """[(kind, response, meta)] -> [task dict or None]: parse each proposal and run rules 4-5 in one batch."""
    parsed, jobs = [], []
    for kind, text, meta in kinds_texts:
        try:
            if kind == "induction":
                inputs, message = parse_induction_proposal(text, cfg.n_induction_inputs)
                parsed.append(dict(program=meta["program"], inputs=inputs, message=message))
                jobs.append((meta["program"], inputs))
            else:
                program, i = parse_proposal(text, strip=strip)
                parsed.append(dict(program=program, input=i))
                jobs.append((program, [i]))
        except (ValueError, RecursionError, MemoryError, SyntaxError):  # Invalid is a ValueError
            parsed.append(None)
    valid = iter(validate_proposals(executor, jobs) if jobs else [])
    tasks = []
    for task in parsed:
        outputs = next(valid) if task is not None else None
        if outputs is None:  # failed rules 4-5 (the executor enforces --max-output-chars)
            tasks.append(None)
        elif "inputs" in task:
            tasks.append(dict(task, outputs=outputs))
        else:
            tasks.append(dict(task, output=outputs[0]))
    return tasks


# Sampler seeds per phase, so that every phase of every step draws fresh, reproducible noise.
SEED_PROPOSE, SEED_LEARNABILITY, SEED_SOLVE, SEED_SEEDING = range(4)


def azr_step(step, policy, optimizer, executor, buffers, cfg, rng, world=(0, 1), log=None):
    """Algorithm 1: propose -> validate -> learnability rollouts -> solve -> grade -> TRR++ advantages -> update.
    The executor exists on rank 0 only (None elsewhere); its verdicts are broadcast."""
    kinds, timer, metrics, rollouts, rank0 = cfg.kinds, Timer(), {}, [], world[0] == 0
    N = cfg.n_learnability
    fits = lambda ids: len(ids) <= cfg.max_prompt_tokens  # noqa: E731

    # 1. Propose: one response per proposer prompt, all kinds in one sampler call, then validate in one batch.
    with timer("generate"):
        proposer = [(kind, ids, meta) for kind in kinds
                    for ids, meta in build_proposer_prompts(kind, buffers, policy, cfg, rng)]
        proposals = policy.sample([ids for _, ids, _ in proposer], n=1, seed=step * 8 + SEED_PROPOSE)
    with timer("execute"):
        tasks = from_rank0(rank0 and check_proposals(
            executor, [(kind, extract_answer(text) or "", meta) for (kind, _, meta), (_, text) in zip(proposer, proposals)],
            cfg), world)

    # 2. Learnability rollouts (Eq. 4; reward only, not trained on) for the valid, well-formatted proposals (a
    #    broken format earns -1 whatever the solve rate; a solver prompt too long for --max-prompt-tokens gets the
    #    trivial reward, as upstream, and is counted), then the solver batch: this step's valid tasks first,
    #    filled from the buffer. Grading the learnability answers overlaps the solver generation.
    valid = [(n, kind, task) for n, ((kind, _, _), task) in enumerate(zip(proposer, tasks)) if task is not None]
    learnable, too_long = [], {kind: 0 for kind in kinds}
    for n, kind, task in valid:
        if format_ok(proposals[n][1]):
            ids = policy.encode(SOLVE_PROMPT[kind](task, cfg))
            if fits(ids):
                learnable.append((n, kind, task, ids))
            else:
                too_long[kind] += 1
    with timer("generate"):
        learn_outs = policy.sample([ids for *_, ids in learnable], n=N, seed=step * 8 + SEED_LEARNABILITY) \
            if learnable else []
    learn_jobs = [(kind, task, extract_answer(text)) for q, (_, kind, task, _) in enumerate(learnable)
                  for _, text in learn_outs[q * N:(q + 1) * N]]
    learn_grading = Background(grade_answers, executor, learn_jobs) if rank0 else None
    with timer("generate"):
        solve_items = []
        for kind in kinds:
            items, dropped = build_solver_batch(kind, [task for _, k, task in valid if k == kind], buffers[kind],
                                                policy, cfg, rng)
            solve_items += items
            metrics[f"dropped/solver_prompt/{kind}"] = dropped
        solve_outs = policy.sample([ids for *_, ids in solve_items], n=1, seed=step * 8 + SEED_SOLVE) \
            if solve_items else []
    with timer("execute"):
        learn = from_rank0(rank0 and learn_grading.result(), world)
        verdicts = from_rank0(rank0 and grade_answers(executor, [
            (kind, task, extract_answer(text)) for (kind, task, _), (_, text) in zip(solve_items, solve_outs)]), world)

    # 3. Rewards. Proposer (Eq. 4, 6); every valid task enters its buffer, whatever its reward (as upstream).
    solve_rate = {n: sum(learn[q * N:(q + 1) * N]) / N for q, (n, *_) in enumerate(learnable)}
    for n, ((kind, ids, _), (sample, text)) in enumerate(zip(proposer, proposals)):
        reward = proposer_reward(tasks[n] is not None, format_ok(text), solve_rate.get(n, 0.0),
                                 cfg.trivial_proposal_reward)
        rollouts.append(Rollout(f"propose_{kind}", ids, sample.tokens, sample.logprobs, text, reward,
                                finish_reason=sample.finish_reason))
        if tasks[n] is not None:
            buffers[kind].add(tasks[n])
    # Solver (Eq. 5-6).
    for (kind, _, ids), (sample, text), correct in zip(solve_items, solve_outs, verdicts):
        rollouts.append(Rollout(f"solve_{kind}", ids, sample.tokens, sample.logprobs, text,
                                solver_reward(solver_format_ok(kind, text), correct), finish_reason=sample.finish_reason))
    for kind in kinds:
        mine = [n for n, (k, _, _) in enumerate(proposer) if k == kind]
        metrics[f"valid_rate/{kind}"] = mean([tasks[n] is not None for n in mine])
        metrics[f"learnability_solve_rate/{kind}"] = mean([solve_rate[n] for n in mine if n in solve_rate])
        metrics[f"accuracy/solve_{kind}"] = mean([v for (k, _, _), v in zip(solve_items, verdicts) if k == kind])
        metrics[f"dropped/proposer_prompt/{kind}"] = cfg.batch_size - len(mine)
        metrics[f"dropped/learnability_prompt/{kind}"] = too_long[kind]
        metrics[f"truncated/learnability_{kind}"] = mean([s.finish_reason == "length" for q, (_, k, _, _) in
                                                          enumerate(learnable) if k == kind
                                                          for s, _ in learn_outs[q * N:(q + 1) * N]])

    # 4. Task-Relative REINFORCE++: one baseline per task-role batch (Eq. 8), then one update on the step.
    for key in sorted({r.key for r in rollouts}):
        group = [r for r in rollouts if r.key == key]
        for r, a in zip(group, trr_advantages([r.reward for r in group])):
            r.advantage = a
        metrics[f"reward/{key}"] = mean([r.reward for r in group])
        metrics[f"response_tokens/{key}"] = mean([len(r.tokens) for r in group])
        metrics[f"truncated/{key}"] = mean([r.finish_reason == "length" for r in group])
    trained = [r for r in rollouts if cfg.train_proposer or r.key.startswith("solve_")]
    with timer("train"):
        metrics.update(policy_update(policy.trainable, optimizer, trained, cfg, world))
        policy.refresh_sampler()

    metrics.update({f"buffer/{k}": len(buffers[k]) for k in KINDS}, **{f"time/{k}": v for k, v in timer.items()})
    metrics["generated_tokens"] = sum(len(s.tokens) for s, _ in proposals + learn_outs + solve_outs)
    metrics["trained_tokens"] = sum(len(r.tokens) + len(r.prompt) for r in trained)
    metrics["tokens_per_s"] = metrics["generated_tokens"] / max(metrics["time/generate"], 1e-9)
    if log is not None:
        log(step, rollouts)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Buffers at the start: zero triplet, then a seed file or seeding by the base model (Sec. 3.3.1, SPEC 7).

def init_buffers(policy, executor, cfg, rng, world):
    rank0 = world[0] == 0
    buffers = new_buffers(cfg)
    buffers["induction"].add(from_rank0(rank0 and zero_induction(executor, cfg), world))
    if cfg.seed_file:
        if rank0:
            load_seed_file(cfg.seed_file, executor, cfg, buffers)
        items = from_rank0({k: list(b.items) for k, b in buffers.items()}, world)
        for k, b in buffers.items():
            for task in items[k]:
                b.add(task)
        return buffers
    # Seeding (no updates): first the shared deduction/abduction pool, then induction entries over its programs.
    for rnd in range(cfg.seed_rounds):
        io_kinds = [k for k in ("deduction", "abduction") if k in cfg.kinds]
        kinds = [k for k in io_kinds if len(buffers[k]) < cfg.seed_size] or \
            [k for k in ("induction",) if k in cfg.kinds and len(buffers[k]) < cfg.seed_size]
        if not kinds:
            break
        proposer = [(kind, ids, meta) for kind in kinds
                    for ids, meta in build_proposer_prompts(kind, buffers, policy, cfg, rng)]
        outs = policy.sample([ids for _, ids, _ in proposer], n=1, seed=rnd * 8 + SEED_SEEDING)
        # Seeding parses the whole response when there is no <answer> (base models often skip the format) and
        # strips comments and top-level statements, as upstream did.
        tasks = from_rank0(rank0 and check_proposals(
            executor, [(kind, extract_answer(text) or text, meta) for (kind, _, meta), (_, text) in zip(proposer, outs)],
            cfg, strip=True), world)
        for (kind, _, _), task in zip(proposer, tasks):
            targets = ("induction",) if kind == "induction" else io_kinds  # one shared deduction/abduction pool
            if task is not None and len(buffers[targets[0]]) < cfg.seed_size:
                for k in targets:
                    buffers[k].add(dict(task))
        if rank0:
            print(f"seeding round {rnd}: " + ", ".join(f"{k} {len(buffers[k])}" for k in KINDS), flush=True)
    else:
        if rank0 and cfg.seed_size:
            print(f"warning: seeding stopped after {cfg.seed_rounds} rounds below {cfg.seed_size} tasks", flush=True)
    return buffers


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: the model in Hugging Face format plus optimizer, buffers, step and RNG states, written atomically.

def save_checkpoint(run_dir, step, policy, optimizer, buffers, rng, world, keep=0):
    """checkpoints/step_NNNNNN/{model/, optimizer.pt, state.json, buffers.json}, built in a temporary directory and
    renamed into place, then `latest` is rewritten the same way: a crash leaves the previous checkpoint intact."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    optim_state = get_optimizer_state_dict(policy.trainable, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model, rank0 = policy.trainable.model, world[0] == 0
    if world[1] > 1:  # gather the shards tensor by tensor into rank 0's host memory
        full = {}
        for k, v in model.state_dict().items():
            v = v.full_tensor() if hasattr(v, "full_tensor") else v  # a collective: every rank takes part
            if rank0:
                full[k] = v.cpu()
        if rank0:
            with torch.device("meta"):
                model = Transformer(model.config)
            model.load_state_dict(full, assign=True)
            model.tie_weights()
    if not rank0:
        return None
    final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, policy.tokenizer, tmp / "model")
    torch.save(optim_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(dict(step=step, rng=rng.getstate())))
    (tmp / "buffers.json").write_text(json.dumps({k: list(b.items) for k, b in buffers.items()}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest = final.parent / "latest.tmp"
    latest.write_text(final.name)
    os.replace(latest, final.parent / "latest")
    for old in sorted(final.parent.glob("step_??????"))[:-keep] if keep else []:
        shutil.rmtree(old)
    return final


def find_checkpoint(cfg):
    if cfg.resume != "auto":
        path = Path(cfg.resume)
    else:
        latest = Path(cfg.out_dir) / "checkpoints" / "latest"
        if not latest.is_file():
            return None
        path = latest.parent / latest.read_text().strip()
    if not (path / "state.json").is_file():
        raise SystemExit(f"error: --resume {path} is not a checkpoint directory (no state.json); pass "
                         f"runs/NAME/checkpoints/step_NNNNNN or 'auto'")
    return path


def restore_checkpoint(path, policy, optimizer, cfg, rng, world):
    """The model weights were loaded from path/model already; this restores the rest. Only rank 0 reads the full
    optimizer state; FSDP2 shards it out to the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    optim_state = torch.load(path / "optimizer.pt", weights_only=True) if world[0] == 0 else {}
    set_optimizer_state_dict(policy.trainable, optimizer, optim_state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=world[1] > 1))
    state = json.loads((path / "state.json").read_text())
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    buffers = {k: TaskBuffer(cfg.buffer_cap) for k in KINDS}
    for k, items in json.loads((path / "buffers.json").read_text()).items():
        for task in items:
            buffers[k].add(task)
    return state["step"], buffers


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: CRUXEval-O (deduction) and CRUXEval-I (abduction), greedy, graded like training (Sec. 4, SPEC 9).

def evaluate_cruxeval(policy, executor, path, limit=0, max_new_tokens=None, out_path=None, world=(0, 1)):
    """Greedy pass@1 on CRUXEval-O and CRUXEval-I with the training prompts, extraction and grading."""
    rows = read_jsonl(path, CRUXEVAL_FIELDS)
    rows = rows[:limit] if limit else rows
    items = [(kind, dict(program=r["code"], input=r["input"], output=r["output"]), r["id"])
             for kind in ("deduction", "abduction") for r in rows]
    outs = policy.sample([policy.encode(SOLVE_PROMPT[kind](task, policy.cfg)) for kind, task, _ in items], n=1,
                         seed=0, max_new_tokens=max_new_tokens, temperature=0.0, progress=True)
    answers = [extract_answer(text) for _, text in outs]
    verdicts = from_rank0(world[0] == 0 and grade_answers(executor, [(k, t, a) for (k, t, _), a in zip(items, answers)]),
                          world)
    scores = {f"cruxeval_{'o' if kind == 'deduction' else 'i'}": mean([v for (k, _, _), v in zip(items, verdicts)
                                                                       if k == kind]) for kind in ("deduction", "abduction")}
    scores["cruxeval_items"] = len(rows)
    if out_path and world[0] == 0:
        with open(out_path, "w") as f:
            for (kind, _, id_), (_, text), answer, ok in zip(items, outs, answers, verdicts):
                f.write(json.dumps(dict(id=id_, task="CRUXEval-O" if kind == "deduction" else "CRUXEval-I",
                                        answer=answer, correct=ok, response=text)) + "\n")
    return scores


def eval_main(argv):
    p = argparse.ArgumentParser(prog="azr.py eval", description="Greedy CRUXEval-I/O pass@1 of a model or checkpoint.")
    p.add_argument("--model", required=True, help="checkpoint .../model directory, HF directory, hub id or 'tiny'")
    p.add_argument("--data", required=True, help="cruxeval.jsonl (fields code, input, output, id)")
    p.add_argument("--limit", type=int, default=0, help="first N items only (0: all 800)")
    p.add_argument("--max-new-tokens", type=int, default=8096, help="generation limit per answer")
    p.add_argument("--out", default="", help="per-item JSONL (default: cruxeval_answers.jsonl beside a checkpoint's "
                                             "model/ directory, else ./<model>_cruxeval_answers.jsonl)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="", choices=("", "bf16", "fp32"),
                   help="weights and compute (default: bf16 on cuda, fp32 on cpu; bf16 is about twice as fast on "
                        "CPUs with bf16 support)")
    p.add_argument("--exec-workers", type=int, default=os.cpu_count() or 1, help="executor worker processes")
    p.add_argument("--exec-unsafe", action="store_true", help="as for training: see `azr.py --help`")
    args = p.parse_args(argv)
    for flag, value, least in (("--limit", args.limit, 0), ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--exec-workers", args.exec_workers, 1)):
        if value < least:
            p.error(f"{flag} must be at least {least}, got {value}")
    check_device(args.device, p.error)
    if not Path(args.data).is_file():
        p.error(f"--data {args.data} not found; get data/cruxeval.jsonl from https://github.com/facebookresearch/cruxeval")
    read_jsonl(args.data, CRUXEVAL_FIELDS)  # a malformed file fails here, before the model loads
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    cfg = Config(model=args.model, device=args.device, temperature=0.0, max_response_tokens=args.max_new_tokens,
                 exec_workers=args.exec_workers, exec_unsafe=args.exec_unsafe)
    model, tokenizer = load_model(args.model, device=args.device, dtype=dtype)
    policy = Policy(model, tokenizer, cfg, (0, 1), trains=False)
    out = args.out or (Path(args.model).parent / "cruxeval_answers.jsonl" if Path(args.model).is_dir()
                       else f"{Path(args.model).name}_cruxeval_answers.jsonl")
    with make_executor(cfg) as executor:
        scores = evaluate_cruxeval(policy, executor, args.data, args.limit, args.max_new_tokens, out)
    n = scores["cruxeval_items"]
    print(f"CRUXEval-O pass@1 {scores['cruxeval_o']:.4f} ({round(scores['cruxeval_o'] * n)}/{n})  "
          f"CRUXEval-I pass@1 {scores['cruxeval_i']:.4f} ({round(scores['cruxeval_i'] * n)}/{n})  ({out})")
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Plot a run: rewards per task-role, valid-proposal rate and CRUXEval over steps.

def plot_main(argv):
    p = argparse.ArgumentParser(prog="azr.py plot", description="Plot metrics.jsonl of a run (PNG, or a text table).")
    p.add_argument("run_dir")
    run = Path(p.parse_args(argv).run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise SystemExit(f"error: {run}/metrics.jsonl not found; pass the --out-dir of a training run")
    rows = read_jsonl(run / "metrics.jsonl")
    panels = [("reward", "reward/"), ("valid proposals", "valid_rate/"), ("CRUXEval", "cruxeval_")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        keys = [k for _, prefix in panels for k in sorted({k for r in rows for k in r if k.startswith(prefix)})]
        lines = ["step  " + "  ".join(keys)]
        lines += [f"{r['step']:<5} " + "  ".join(f"{r[k]:>{len(k)}.3f}" if isinstance(r.get(k), (int, float))
                                                 else " " * (len(k) - 1) + "-" for k in keys) for r in rows]
        (run / "metrics.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return run / "metrics.txt"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, prefix) in zip(axes, panels):
        for key in sorted({k for r in rows for k in r if k.startswith(prefix)}):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=key.removeprefix(prefix), marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run / "metrics.png", dpi=100)
    print(run / "metrics.png")
    return run / "metrics.png"


# ----------------------------------------------------------------------------------------------------------------
# Training entry point.

def init_distributed(cfg):
    """torchrun: one process per GPU. The device is set before init so NCCL binds to it; the timeout covers the
    longest phase one rank runs alone (rank 0 writes checkpoints and runs the executor while the others wait
    in a collective), where NCCL's default watchdog (10 min) would abort the job."""
    if "RANK" not in os.environ:
        return 0, 1
    from datetime import timedelta
    device = None
    if cfg.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device else "gloo", timeout=timedelta(minutes=cfg.dist_timeout),
                            device_id=device)
    return dist.get_rank(), dist.get_world_size()


def step_flops(n_params, metrics):
    """Model FLOPs of one step: forward + backward (6N) per trained token, forward (2N) per generated one."""
    return 6 * n_params * metrics["trained_tokens"] + 2 * n_params * metrics["generated_tokens"]


def peak_flops(cfg):
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    name = torch.cuda.get_device_name() if cfg.device == "cuda" else ""
    return next((tf * 1e12 for key, tf in (("H200", 989), ("H100", 989), ("A100", 312), ("A800", 312)) if key in name), 0.0)


def write_samples(run_dir, cfg):
    def log(step, rollouts):
        with open(Path(run_dir) / "samples.txt", "a") as f:
            for key in sorted({r.key for r in rollouts}):
                for r in [r for r in rollouts if r.key == key][:cfg.log_samples]:
                    f.write(f"=== step {step} {key} reward {r.reward:+.2f} ===\n<think>{r.text}\n\n")
    return log


def make_executor(cfg):
    try:
        return Executor(workers=cfg.exec_workers, timeout=cfg.exec_timeout, max_output_chars=cfg.max_output_chars,
                        unsafe=cfg.exec_unsafe)
    except RuntimeError as e:  # e.g. root on a machine that refuses the private mount namespace the uid layer needs
        raise SystemExit(f"error: {e} (azr.py: --exec-unsafe)")


def step_line(step, metrics, cfg):
    """One line per step: rewards per task-role, then the health of the step (valid proposals, PPO clip
    fraction and the largest |log pi - log pi_old|, share of trained responses cut by the length limit, prompts
    dropped for length) and its time."""
    rewards = "  ".join(f"{k.removeprefix('reward/')} {metrics[k]:+.3f}" for k in sorted(metrics)
                        if k.startswith("reward/"))
    valid = mean([metrics[f"valid_rate/{k}"] for k in cfg.kinds])
    cut = mean([v for k, v in metrics.items() if k.startswith(("truncated/propose_", "truncated/solve_"))])
    dropped = sum(v for k, v in metrics.items() if k.startswith("dropped/"))
    return (f"step {step}: {rewards}  valid {valid:.2f}  clip {metrics['clip_fraction']:.3f}  "
            f"max|dlogp| {metrics['max_abs_log_ratio']:.3f}  cut {cut:.2f}  dropped {dropped}  "
            f"{metrics['time/step']:.1f}s")


def train(cfg):
    world = init_distributed(cfg)
    rank0 = world[0] == 0
    device = f"cuda:{torch.cuda.current_device()}" if cfg.device == "cuda" else "cpu"
    run_dir = Path(cfg.out_dir)
    ckpt = find_checkpoint(cfg) if cfg.resume else None
    torch.manual_seed(cfg.seed)
    # fp32 master weights; training computes in bf16 through autocast (one process) or FSDP2 mixed precision
    model, tokenizer = load_model(str(ckpt / "model") if ckpt else cfg.model, device=device, seed=cfg.seed)
    for block in model.layers:
        block.checkpointing = cfg.grad_checkpoint
    policy = Policy(model, tokenizer, cfg, world)
    optimizer = torch.optim.AdamW(policy.trainable.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    executor = make_executor(cfg) if rank0 else None
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    try:
        if ckpt:
            start, buffers = restore_checkpoint(ckpt, policy, optimizer, cfg, rng, world)
            if rank0 and (run_dir / "metrics.jsonl").is_file():  # drop rows logged after the checkpoint
                rows = (run_dir / "metrics.jsonl").read_text().splitlines()
                kept = [r for r in rows if r.strip() and json.loads(r)["step"] <= start]
                (run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in kept))
        else:
            start, buffers = 0, init_buffers(policy, executor, cfg, rng, world)
        log = write_samples(run_dir, cfg) if rank0 else None
        flops_peak = peak_flops(cfg) * world[1]
        n_params = sum(p.numel() for p in model.parameters())
        for step in tqdm(range(start + 1, cfg.steps + 1), desc="self-play", disable=not rank0, initial=start,
                         total=cfg.steps):
            t0 = time.perf_counter()
            metrics = azr_step(step, policy, optimizer, executor, buffers, cfg, rng, world, log)
            metrics["time/step"] = time.perf_counter() - t0
            if flops_peak:
                metrics["mfu"] = step_flops(n_params, metrics) / (metrics["time/step"] * flops_peak)
            if cfg.eval_every and step % cfg.eval_every == 0:
                t0 = time.perf_counter()
                metrics.update(evaluate_cruxeval(policy, executor, cfg.eval_data, cfg.eval_limit,
                                                 cfg.max_response_tokens, world=world))
                metrics["time/eval"] = time.perf_counter() - t0
            if rank0:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(dict(step=step, **metrics)) + "\n")
                tqdm.write(step_line(step, metrics, cfg))
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                save_checkpoint(run_dir, step, policy, optimizer, buffers, rng, world, cfg.keep_checkpoints)
    finally:
        if executor is not None:
            executor.close()
        if world[1] > 1:
            dist.barrier()  # rank 0 may still be writing the last checkpoint
            dist.destroy_process_group()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        return eval_main(argv[1:])
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    return train(parse_config(argv))


if __name__ == "__main__":
    main()
