"""Benchmarks from the Hugging Face hub: LongBench, RULER (pre-generated), PG19, InfiniteBench.

For users with hub access. Everything goes through the ``datasets`` library, an optional
dependency (``pip install "kvframe[hub]"``) imported only when a loader runs; without it a loader
raises :class:`~kvframe.errors.ConfigError`. Every loader also takes ``data_files=`` (local
json/jsonl/parquet/csv files in the hub format, a path, a list of paths, or a ``{split: paths}``
dict), read with ``datasets.load_dataset("json" | "parquet" | "csv", data_files=...)``, so the
same code path runs offline (that is how the tests run). Rows are taken in file order; the first
``n_samples`` are used.

Generation tasks split every prompt into a ``context`` part (the instruction before the document
and the document: what query-agnostic mode prefills and compresses) and a ``question`` part (what
is fed after compression). **The full prompt is exactly ``context + question``** (no separator;
``Sample.meta["join"] == ""``), which is the benchmark's own template. ``Sample.meta`` also carries
``max_new_tokens`` (the benchmark's generation length), ``chat`` (whether the benchmark wraps the
prompt in the model's chat template; LongBench does not for its few-shot and code datasets) and
the fields each scorer needs. Scores are in ``[0, 1]`` (LongBench, RULER and InfiniteBench report
them times 100).

Hub ids: ``THUDM/LongBench`` (mirror ``zai-org/LongBench``),
``deepmind/pg19`` (parquet mirrors ``emozilla/pg19``, ``emozilla/pg19-test``),
``xinrongzhang2022/InfiniteBench``; RULER has no official hub copy (generate it with NVIDIA/RULER
and pass the jsonl files). ``THUDM/LongBench`` and ``deepmind/pg19`` are built by loading scripts,
which ``datasets`` >= 4 no longer runs: for LongBench the loader then downloads the repository's
``data.zip`` with ``huggingface_hub``, extracts ``data/<dataset>.jsonl`` under kvframe's cache
folder (``$KVFRAME_CACHE_DIR/longbench``) and reads it through the json builder;
for PG19 use a parquet mirror (``path="emozilla/pg19"``) or ``data_files``.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kvframe.errors import ConfigError, unknown_name
from kvframe.eval.tasks.base import Sample, Task
from kvframe.eval.tasks.perplexity import StreamTask, cut_to_tokens

__all__ = [
    "HUB_PIP",
    "INFINITEBENCH_MAX_NEW_TOKENS",
    "INFINITEBENCH_SUBSETS",
    "INFINITEBENCH_TEMPLATES",
    "LONGBENCH_DATASETS",
    "LONGBENCH_MAXLEN",
    "LONGBENCH_NO_CHAT",
    "LONGBENCH_PROMPTS",
    "RULER_MAX_NEW_TOKENS",
    "InfiniteBenchTask",
    "LongBenchTask",
    "PG19Task",
    "RulerHubTask",
    "load_rows",
    "require_datasets",
    "truncate_middle",
]

#: What to install for the hub loaders.
HUB_PIP = 'pip install "kvframe[hub]"'


# ---------------------------------------------------------------------------
# datasets access
# ---------------------------------------------------------------------------


def require_datasets() -> Any:
    """Import and return the ``datasets`` module, or raise ConfigError saying how to install it."""
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(
            f"the hub loaders need the optional dependency `datasets`; install it with `{HUB_PIP}` "
            "(or `pip install datasets`)"
        ) from err
    return datasets


_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _file_format(path: str) -> str:
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    fmt = _FORMATS.get(Path(name).suffix)
    if fmt is None:
        raise ConfigError(f"data file {path!r}: unknown format; accepted extensions: {', '.join(sorted(_FORMATS))}")
    return fmt


def _normalize_files(data_files: Any) -> tuple[Any, list[str]]:
    """``data_files`` as ``datasets`` accepts it (str paths) and the flat list of its paths."""
    if isinstance(data_files, (str, Path)):
        return str(data_files), [str(data_files)]
    if isinstance(data_files, Mapping):
        out: dict[str, Any] = {}
        flat: list[str] = []
        for key, value in data_files.items():
            sub, paths = _normalize_files(value)
            out[str(key)] = sub
            flat += paths
        return out, flat
    if isinstance(data_files, Iterable):
        paths = [str(p) for p in data_files]
        if not paths:
            raise ConfigError("data_files is empty")
        return paths, paths
    raise ConfigError(f"data_files must be a path, a list of paths or a {{split: paths}} dict; got {type(data_files).__name__}")


def load_rows(
    path: str | None,
    name: str | None = None,
    split: str = "test",
    data_files: Any = None,
    features: Any = None,
    cache_dir: str | Path | None = None,
) -> Any:
    """A ``datasets.Dataset`` from the hub (``path``, config ``name``, ``split``) or from local files.

    With ``data_files`` the builder is chosen by extension (json/jsonl, parquet, csv) and ``split``
    selects a key when ``data_files`` is a ``{split: files}`` dict (else the single ``train`` split
    ``datasets`` makes of plain files is used).
    """
    ds = require_datasets()
    kwargs: dict[str, Any] = {}
    if features is not None:
        kwargs["features"] = features
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if data_files is not None:
        files, flat = _normalize_files(data_files)
        formats = {_file_format(p) for p in flat}
        if len(formats) != 1:
            raise ConfigError(f"data_files mix formats {sorted(formats)}; pass files of one format")
        missing = [p for p in flat if "*" not in p and not Path(p).exists()]
        if missing:
            raise ConfigError(f"data files not found: {missing}")
        use_split = split if isinstance(files, dict) else "train"
        if isinstance(files, dict) and split not in files:
            raise ConfigError(f"split {split!r} is not in data_files (has {sorted(files)})")
        return ds.load_dataset(formats.pop(), data_files=files, split=use_split, **kwargs)
    if not path:
        raise ConfigError("give a hub dataset path or data_files")
    return ds.load_dataset(path, name, split=split, **kwargs)


def _is_script_error(err: Exception) -> bool:
    return "script" in str(err).lower()


def _take(rows: Iterable[Mapping[str, Any]], n: int | None) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if n is not None and len(out) >= n:
            break
        out.append(dict(row))
    return out


def _check_n(n: int | None) -> None:
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ConfigError(f"n_samples must be a non-negative integer or None, got {n!r}")


def truncate_middle(tokenizer: Any, sample: Sample, max_tokens: int) -> Sample:
    """LongBench-style middle truncation: keep the prompt within ``max_tokens`` tokens.

    LongBench keeps the first and last ``max_tokens // 2`` tokens of an over-long prompt. Here the
    cut is made inside the ``context`` part (the question part is kept whole): the context keeps
    its first ``max_tokens // 2`` tokens and as many of its last tokens as leave room for the
    question, decoded back to text. Returns ``sample`` unchanged when it fits.
    """
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise ConfigError(f"max_tokens must be an integer >= 2, got {max_tokens!r}")
    ctx = list(tokenizer(sample.context).input_ids)
    n_q = len(tokenizer(sample.question, add_special_tokens=False).input_ids) if sample.question else 0
    if len(ctx) + n_q <= max_tokens:
        return sample
    room = max_tokens - n_q
    head = min(max_tokens // 2, room)
    if head < 1:
        raise ConfigError(f"max_tokens={max_tokens} leaves no room for the context (the question alone is {n_q} tokens)")
    tail = room - head
    kept = ctx[:head] + (ctx[-tail:] if tail > 0 else [])
    text = tokenizer.decode(kept, skip_special_tokens=True)
    meta = {**sample.meta, "truncated_to": max_tokens}
    return Sample(id=sample.id, context=text, question=sample.question, answers=sample.answers, meta=meta)


def _check_source(data_files: Any) -> None:
    """Fail before any model loads: ``datasets`` importable and local data files present."""
    require_datasets()
    if data_files is not None:
        _, flat = _normalize_files(data_files)
        missing = [p for p in flat if "*" not in p and not Path(p).exists()]
        if missing:
            raise ConfigError(f"data files not found: {missing}")


def _fill(template: str, **fields: str) -> str:
    """Fill ``{name}`` fields in one pass (values are never re-scanned, braces in them stay)."""
    return re.sub(r"\{(\w+)\}", lambda m: fields.get(m.group(1), m.group(0)), template)


# ---------------------------------------------------------------------------
# LongBench
# ---------------------------------------------------------------------------

#: LongBench's English datasets.
LONGBENCH_DATASETS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
    "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)

_QA_SHORT = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
_NARRATIVE = "Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation."
_QASPER = (
    "Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question "
    "cannot be answered based on the information in the article, write \"unanswerable\". If the question is a "
    "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation."
)

_MULTIHOP = (
    _QA_SHORT + "\n\nThe following are given passages.\n{context}",
    "\n\n" + _QA_SHORT + "\n\nQuestion: {input}\nAnswer:",
)

#: LongBench's ``dataset2prompt``, each template split into (context part, question part): the full
#: prompt is ``context_part.format(context=...) + question_part.format(input=...)``.
LONGBENCH_PROMPTS: dict[str, tuple[str, str]] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        + _NARRATIVE + "\n\nStory: {context}",
        "\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    ),
    "qasper": (
        "You are given a scientific article and a question. " + _QASPER + "\n\nArticle: {context}",
        "\n\n Answer the question based on the above article as concisely as you can, using a single phrase or "
        "sentence if possible. If the question cannot be answered based on the information in the article, write "
        "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". "
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}",
        "\n\nNow, answer the following question based on the above text, only give me the answer and do not output "
        "any other words.\n\nQuestion: {input}\nAnswer:",
    ),
    "hotpotqa": _MULTIHOP,
    "2wikimqa": _MULTIHOP,
    "musique": _MULTIHOP,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}",
        "\n\nNow, write a one-page summary of the report.\n\nSummary:",
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
        "or more sentences.\n\nTranscript:\n{context}",
        "\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}",
        "\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    ),
    "trec": ("Please determine the type of the question below. Here are some examples of questions.\n\n{context}", "\n{input}"),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}",
        "\n\n{input}",
    ),
    "samsum": ("Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}", "\n\n{input}"),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
        "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, "
        "how many non-repeating paragraphs are there in total?\n\n{context}",
        "\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only "
        "contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}",
        "\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is "
        "from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    ),
    "lcc": ("Please complete the code given below. \n{context}", "Next line of code:\n"),
    "repobench-p": ("Please complete the code given below. \n{context}", "{input}Next line of code:\n"),
}

#: LongBench's ``dataset2maxlen`` (max new tokens).
LONGBENCH_MAXLEN: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}

#: Datasets LongBench prompts without the chat template (few-shot and code completion).
LONGBENCH_NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})


def _longbench_zip_rows(path: str, dataset: str, cache_dir: str | Path | None) -> Any:
    """Script-free route for ``THUDM/LongBench``: its ``data.zip`` read through the json builder."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:  # pragma: no cover - datasets depends on huggingface_hub
        raise ConfigError(f"loading {path} needs huggingface_hub; install it with `{HUB_PIP}`") from err
    from kvframe.eval.models import cache_dir as kvframe_cache_dir

    archive = Path(hf_hub_download(repo_id=path, filename="data.zip", repo_type="dataset"))
    # extracted once per archive version (the resolved blob name is its content hash)
    target = kvframe_cache_dir() / "longbench" / archive.resolve().name / f"{dataset}.jsonl"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive) as zf:
            member = next((n for n in zf.namelist() if n.endswith(f"/{dataset}.jsonl") or n == f"{dataset}.jsonl"), None)
            if member is None:
                raise ConfigError(f"{path}/data.zip has no {dataset}.jsonl")
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(zf.read(member))
            os.replace(tmp, target)
    return load_rows(None, data_files=str(target), cache_dir=cache_dir)


@dataclass
class LongBenchTask(Task):
    """One LongBench (v1) English dataset.

    Rows have LongBench's fields ``input, context, answers, length, dataset, language, all_classes,
    _id``. ``samples`` fill LongBench's prompt template (:data:`LONGBENCH_PROMPTS`), split into the
    context part and the question part; ``meta`` holds ``dataset``, ``length`` (LongBench's word
    count), ``language``, ``all_classes``, ``max_new_tokens`` (:data:`LONGBENCH_MAXLEN`), ``chat``,
    ``metric`` and ``join`` (``""``). :meth:`score` is
    :func:`kvframe.eval.metrics.longbench_score` (the dataset's metric, maximum over the reference
    answers, first line only for trec/triviaqa/samsum), in ``[0, 1]`` (LongBench reports x100).
    Long prompts are not truncated here; use :func:`truncate_middle` for LongBench's middle
    truncation to the model's window.

    ``exact`` (default true) scores ROUGE-L and code similarity as LongBench's own script does (the
    ``rouge`` package and a whole-percent fuzzy ratio), so numbers compare with published LongBench
    tables; ``exact: false`` uses the plain ROUGE-L of ``rouge-score`` and the edit similarity
    (see :func:`kvframe.eval.metrics.rouge_l_score` for where the two differ).
    """

    name: ClassVar[str] = "longbench"
    metric: ClassVar[str] = "longbench"

    dataset: str
    path: str = "THUDM/LongBench"
    split: str = "test"
    n_samples: int | None = None
    data_files: Any = None
    cache_dir: str | None = None
    exact: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.exact, bool):
            raise ConfigError(f"longbench exact={self.exact!r}; accepted: true (LongBench's own ROUGE-L and code scores) or false")
        if self.dataset not in LONGBENCH_PROMPTS:
            raise unknown_name("LongBench dataset", str(self.dataset), LONGBENCH_DATASETS)
        _check_n(self.n_samples)
        # per instance: results of several datasets in one run stay apart (usable in file names)
        self.name = f"longbench_{self.dataset}"  # type: ignore[misc]
        self.metric = _longbench_metric_name(self.dataset)  # type: ignore[misc]
        self._samples: list[Sample] | None = None

    def check(self) -> None:
        _check_source(self.data_files)

    @property
    def max_new_tokens(self) -> int:
        return LONGBENCH_MAXLEN[self.dataset]

    def rows(self) -> list[dict[str, Any]]:
        if self.data_files is not None:
            data = load_rows(None, split=self.split, data_files=self.data_files, cache_dir=self.cache_dir)
        else:
            try:
                data = load_rows(self.path, self.dataset, split=self.split, cache_dir=self.cache_dir)
            except Exception as err:  # noqa: BLE001 - datasets raises RuntimeError/ValueError variants
                if not _is_script_error(err):
                    raise
                data = _longbench_zip_rows(self.path, self.dataset, self.cache_dir)
        return _take(data, self.n_samples)

    def sample_from_row(self, row: Mapping[str, Any], index: int) -> Sample:
        ctx_t, q_t = LONGBENCH_PROMPTS[self.dataset]
        context = _fill(ctx_t, context=str(row.get("context") or ""))
        question = _fill(q_t, input=str(row.get("input") or ""))
        answers = row.get("answers") or []
        answers = [answers] if isinstance(answers, str) else list(answers)
        all_classes = row.get("all_classes")
        rid = row.get("_id") or f"{index}"
        return Sample(
            id=f"longbench-{self.dataset}-{rid}",
            context=context,
            question=question,
            answers=tuple(str(a) for a in answers),
            meta={
                "dataset": self.dataset,
                "length": row.get("length"),
                "language": row.get("language"),
                "all_classes": list(all_classes) if all_classes is not None else None,
                "max_new_tokens": self.max_new_tokens,
                "chat": self.dataset not in LONGBENCH_NO_CHAT,
                "metric": self.metric,
                "join": "",
                "index": index,
            },
        )

    def samples(self, tokenizer: Any = None) -> list[Sample]:
        if self._samples is None:
            self._samples = [self.sample_from_row(row, i) for i, row in enumerate(self.rows())]
        return list(self._samples)

    def score(self, prediction: str, sample: Sample) -> float:
        from kvframe.eval.metrics import longbench_score

        return float(
            longbench_score(self.dataset, prediction, list(sample.answers), sample.meta.get("all_classes"), longbench_exact=self.exact)
        )


def _longbench_metric_name(dataset: str) -> str:
    from kvframe.eval.metrics import LONGBENCH_METRICS

    return LONGBENCH_METRICS[dataset].__name__


# ---------------------------------------------------------------------------
# RULER (pre-generated jsonl)
# ---------------------------------------------------------------------------

#: RULER's generation lengths per task family (``tokens_to_generate`` in its configs).
RULER_MAX_NEW_TOKENS: dict[str, int] = {
    "niah": 128,
    "vt": 30, "variable_tracking": 30,
    "cwe": 120, "common_words_extraction": 120,
    "fwe": 50, "freq_words_extraction": 50,
    "qa": 32,
}


def _ruler_family(task: str) -> str:
    t = task.lower()
    for key in sorted(RULER_MAX_NEW_TOKENS, key=len, reverse=True):
        if t == key or t.startswith(key + "_"):
            return key
    raise unknown_name("RULER task", task, ["niah_*", "vt", "cwe", "fwe", "qa_1", "qa_2"])


@dataclass
class RulerHubTask(Task):
    """Pre-generated RULER data: jsonl rows with ``index, input, outputs, length``.

    ``task`` (e.g. ``"niah_single_1"``, ``"vt"``, ``"qa_2"``) picks the scoring rule: QA tasks
    (``qa_*``) use :func:`kvframe.eval.metrics.string_match_part`, every other task
    :func:`kvframe.eval.metrics.string_match_all`, in ``[0, 1]``. When ``task`` is omitted it is taken
    from the first file's folder name, as RULER writes ``<save_dir>/<task>/validation.jsonl``.

    RULER's ``input`` is the whole prompt. It is split at its last line break: the final line (the
    query, e.g. ``"What are all the special magic numbers for ... ?"``) becomes the ``question``
    and the rest the ``context``, so ``context + question == input`` (plus the row's
    ``answer_prefix`` when it has one, which newer RULER versions write separately).
    """

    name: ClassVar[str] = "ruler"
    metric: ClassVar[str] = "string_match"

    data_files: Any = None
    task: str | None = None
    n_samples: int | None = None
    split: str = "validation"  # only used when data_files is a {split: files} dict
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.data_files is None:
            raise ConfigError("RulerHubTask needs data_files (RULER's generated jsonl files); there is no official hub copy")
        _check_n(self.n_samples)
        if self.task is None:
            _, flat = _normalize_files(self.data_files)
            self.task = Path(flat[0]).parent.name
        self._family = _ruler_family(self.task)
        self.name = f"ruler_hub_{self.task}"  # type: ignore[misc]
        self.metric = f"string_match_{self.match}"  # type: ignore[misc]
        self._samples: list[Sample] | None = None

    def check(self) -> None:
        _check_source(self.data_files)

    @property
    def match(self) -> str:
        return "part" if self._family == "qa" else "all"

    def samples(self, tokenizer: Any = None) -> list[Sample]:
        if self._samples is None:
            self._samples = self._load()
        return list(self._samples)

    def _load(self) -> list[Sample]:
        data = load_rows(None, split=self.split, data_files=self.data_files, cache_dir=self.cache_dir)
        out = []
        for i, row in enumerate(_take(data, self.n_samples)):
            text = str(row["input"])
            cut = text.rfind("\n")
            context, question = (text[:cut], text[cut:]) if cut > 0 else ("", text)
            question += str(row.get("answer_prefix") or "")
            outputs = row.get("outputs") or []
            outputs = [outputs] if isinstance(outputs, str) else list(outputs)
            index = row.get("index", i)
            out.append(
                Sample(
                    id=f"ruler-{self.task}-{index}",
                    context=context,
                    question=question,
                    answers=tuple(str(o) for o in outputs),
                    meta={
                        "task": self.task,
                        "length": row.get("length"),
                        "max_new_tokens": RULER_MAX_NEW_TOKENS[self._family],
                        "metric": f"string_match_{self.match}",
                        "chat": True,
                        "join": "",
                        "index": index,
                    },
                )
            )
        return out

    def score(self, prediction: str, sample: Sample) -> float:
        from kvframe.eval.metrics import string_match_all, string_match_part

        fn = string_match_part if self.match == "part" else string_match_all
        return float(fn(prediction, list(sample.answers)))


# ---------------------------------------------------------------------------
# PG19 (streaming perplexity)
# ---------------------------------------------------------------------------


@dataclass
class PG19Task(StreamTask):
    """PG19 books as streams for :func:`kvframe.eval.tasks.perplexity.stream_nll` (field ``text``).

    The books are taken in dataset order; a book shorter than ``length`` tokens is skipped; each
    stream is a whitespace-bounded prefix of the book of >= ``length`` tokens (same cut as the
    sotu task). ``meta`` keeps ``short_book_title``, ``publication_date`` and ``url`` when present.
    ``deepmind/pg19`` is a loading-script dataset; with ``datasets`` >= 4 pass
    ``path="emozilla/pg19"`` (parquet mirror; ``emozilla/pg19-test`` for the test split alone) or
    ``data_files``.
    """

    name: ClassVar[str] = "pg19"

    path: str = "deepmind/pg19"
    split: str = "test"
    n_samples: int | None = 4
    length: int = 4096
    prefill: int = 64
    buckets: int = 8
    data_files: Any = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _check_n(self.n_samples)
        self._check_stream()

    def check(self) -> None:
        _check_source(self.data_files)

    def samples(self, tokenizer: Any) -> list[Sample]:
        try:
            data = load_rows(self.path, split=self.split, data_files=self.data_files, cache_dir=self.cache_dir)
        except Exception as err:  # noqa: BLE001
            if self.data_files is None and _is_script_error(err):
                raise ConfigError(
                    f"{self.path} is a loading-script dataset that this `datasets` version cannot run; "
                    "use path='emozilla/pg19' (parquet mirror) or data_files=..."
                ) from err
            raise
        out: list[Sample] = []
        for i, row in enumerate(data):
            if self.n_samples is not None and len(out) >= self.n_samples:
                break
            cut = cut_to_tokens(tokenizer, str(row["text"]).rstrip(), self.length)
            if cut is None:
                continue
            context, n_tokens = cut
            meta = {k: row[k] for k in ("short_book_title", "publication_date", "url") if k in row}
            meta.update({"source": self.path if self.data_files is None else "data_files", "split": self.split,
                         "index": i, "n_tokens": n_tokens, "length": self.length})
            out.append(Sample(id=f"pg19-{self.split}-L{self.length}-{i}", context=context, meta=meta))
        if self.n_samples is not None and len(out) < self.n_samples:
            raise ConfigError(f"only {len(out)} books have >= {self.length} tokens; asked for n_samples={self.n_samples}")
        return out


# ---------------------------------------------------------------------------
# InfiniteBench
# ---------------------------------------------------------------------------

#: Accepted subset names -> InfiniteBench split names.
INFINITEBENCH_SUBSETS: dict[str, str] = {
    "passkey": "passkey", "Retrieve.PassKey": "passkey",
    "kv_retrieval": "kv_retrieval", "Retrieve.KV": "kv_retrieval",
    "En.QA": "longbook_qa_eng", "longbook_qa_eng": "longbook_qa_eng",
    "En.MC": "longbook_choice_eng", "longbook_choice_eng": "longbook_choice_eng",
}

_CHOICE_INSTRUCTION = (
    "Only one of the following options is correct, tell me the answer using one single letter (A, B, C, or D). "
    "Don't say anything else."
)

#: InfiniteBench's (GPT-4) prompt templates, split into (context part, question part).
INFINITEBENCH_TEMPLATES: dict[str, tuple[str, str]] = {
    "passkey": (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.\n\n{context}",
        "\n\n{input}",
    ),
    "kv_retrieval": (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}",
        "\n\n{input}",
    ),
    "longbook_qa_eng": (
        "Read the book below and answer a question.\n\n{context}",
        "\n\nQuestion: {input}\n\nBe very concise.",
    ),
    "longbook_choice_eng": (
        "Read the book and answer the question.\n\n{context}",
        "\n\nQuestion: {input}\n\n" + _CHOICE_INSTRUCTION + "\nA. {A}\nB. {B}\nC. {C}\nD. {D}",
    ),
}

#: InfiniteBench's generation lengths.
INFINITEBENCH_MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 6, "kv_retrieval": 50, "longbook_qa_eng": 40, "longbook_choice_eng": 40,
}

_LETTERS = "ABCD"


def _infinitebench_features(ds: Any) -> Any:
    # InfiniteBench's README loads with explicit features (its `options`/`answer` columns are
    # otherwise inferred inconsistently across splits)
    seq = getattr(ds, "List", None) or ds.Sequence  # `List` from datasets 4
    return ds.Features(
        {
            "id": ds.Value("int64"),
            "context": ds.Value("string"),
            "input": ds.Value("string"),
            "answer": seq(ds.Value("string")),
            "options": seq(ds.Value("string")),
        }
    )


def _first_int(text: str) -> str:
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


def _words(text: str, chars: str) -> list[str]:
    for c in chars:
        text = text.replace(c, " ")
    return text.split()


def _choice_correct(prediction: str, letter: str, text: str) -> bool:
    """InfiniteBench's En.MC rule: first character, else an answer prefix, else the first lone letter."""
    pred = prediction.strip()
    if not pred:
        return False
    if pred[0] in _LETTERS:
        return pred[0] == letter
    pred = " ".join(_words(pred, "\n\"'.,?!{}"))
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        after = pred[idx + len(prefix) + 1 :]
        return bool(after) and (after.startswith(letter) or (bool(text) and after.startswith(text)))
    for word in pred.split():
        if word in _LETTERS:
            return word == letter
    return False


@dataclass
class InfiniteBenchTask(Task):
    """InfiniteBench (En.QA, En.MC, passkey, kv_retrieval) rows ``context, input, answer, options, id``.

    Prompts are InfiniteBench's GPT-4 templates (:data:`INFINITEBENCH_TEMPLATES`) split into
    context and question parts. Scoring, in ``[0, 1]``: ``passkey`` -> the first integer of the
    prediction equals the answer; ``kv_retrieval`` -> the answer is one of the prediction's words
    (after InfiniteBench's punctuation split); ``En.MC`` -> the predicted option letter (first
    character, else after "answer is"/"answer:"/"option is", else the first standalone A-D) equals
    the gold letter (the answer's index in ``options``; the answer text after a prefix also counts);
    ``En.QA`` -> :func:`kvframe.eval.metrics.qa_f1_score`, maximum over the answers.
    """

    name: ClassVar[str] = "infinitebench"
    metric: ClassVar[str] = "infinitebench"

    subset: str = "passkey"
    path: str = "xinrongzhang2022/InfiniteBench"
    n_samples: int | None = None
    data_files: Any = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.subset not in INFINITEBENCH_SUBSETS:
            raise unknown_name("InfiniteBench subset", str(self.subset), INFINITEBENCH_SUBSETS)
        _check_n(self.n_samples)
        self.name = f"infinitebench_{self.task}"  # type: ignore[misc]
        self.metric = "qa_f1_score" if self.task == "longbook_qa_eng" else "accuracy"  # type: ignore[misc]
        self._samples: list[Sample] | None = None

    def check(self) -> None:
        _check_source(self.data_files)

    @property
    def task(self) -> str:
        return INFINITEBENCH_SUBSETS[self.subset]

    def samples(self, tokenizer: Any = None) -> list[Sample]:
        if self._samples is None:
            self._samples = self._load()
        return list(self._samples)

    def _load(self) -> list[Sample]:
        ds = require_datasets()
        data = load_rows(
            self.path,
            split=self.task,
            data_files=self.data_files,
            features=_infinitebench_features(ds),
            cache_dir=self.cache_dir,
        )
        ctx_t, q_t = INFINITEBENCH_TEMPLATES[self.task]
        out = []
        for i, row in enumerate(_take(data, self.n_samples)):
            answers = row.get("answer") or []
            answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
            options = [str(o) for o in (row.get("options") or [])]
            fields = {"input": str(row.get("input") or "")}
            meta: dict[str, Any] = {
                "task": self.task,
                "max_new_tokens": INFINITEBENCH_MAX_NEW_TOKENS[self.task],
                "chat": True,
                "join": "",
                "index": i,
            }
            if self.task == "longbook_choice_eng":
                if len(options) != 4:
                    raise ConfigError(f"InfiniteBench En.MC row {row.get('id', i)} has {len(options)} options, expected 4")
                fields.update(zip(_LETTERS, options))
                gold = next((a for a in answers if a in options), None)
                if gold is not None:
                    letter = _LETTERS[options.index(gold)]
                elif answers and answers[-1] in _LETTERS:
                    letter, gold = answers[-1], options[_LETTERS.index(answers[-1])]
                else:
                    raise ConfigError(f"InfiniteBench En.MC row {row.get('id', i)}: answer {answers} is not one of its options")
                meta.update(options=options, gold_letter=letter, gold_text=gold)
            rid = row.get("id")
            out.append(
                Sample(
                    id=f"infinitebench-{self.task}-{rid if rid is not None else i}",
                    context=_fill(ctx_t, context=str(row.get("context") or "")),
                    question=_fill(q_t, **fields),
                    answers=tuple(answers),
                    meta=meta,
                )
            )
        return out

    def score(self, prediction: str, sample: Sample) -> float:
        answers = list(sample.answers)
        if self.task == "passkey":
            got = _first_int(prediction)
            return 1.0 if got and got in answers else 0.0
        if self.task == "kv_retrieval":
            words = _words(prediction, "\n:\"'.,?!{}")
            return 1.0 if any(a in words for a in answers) else 0.0
        if self.task == "longbook_choice_eng":
            return 1.0 if _choice_correct(prediction, sample.meta["gold_letter"], sample.meta.get("gold_text", "")) else 0.0
        from kvframe.eval.metrics import qa_f1_score

        if not answers:
            raise ConfigError(f"sample {sample.id} has no reference answers")
        return max(float(qa_f1_score(prediction, a)) for a in answers)
