"""Text classification data: the built-in stdlib-docstring task and user files.

The built-in task labels docstrings of CPython's own standard library with the
package they come from. The docstrings are read with :mod:`ast` from the
stdlib's source files, never imported, so the result does not depend on the
platform, on import side effects or on dict or hash ordering: files are walked
in sorted order, texts are deduplicated, and each text goes to train,
validation or test by a SHA-256 hash of the text itself. The same CPython
version therefore always yields the same split; different versions differ a
little because the docstrings themselves changed.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import random
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

# Packages present as source in every CPython from 3.10 to 3.13, each with
# well over 100 docstrings, and none that distributions split into optional
# packages (tkinter, idlelib) or that were removed (lib2to3, distutils).
STDLIB_PACKAGES = (
    "asyncio",
    "email",
    "http",
    "importlib",
    "logging",
    "multiprocessing",
    "unittest",
    "xml",
)

# Docstrings shorter than this are mostly "Constructor." or "Return self."
# and carry no signal about where they come from.
MINIMUM_DOCSTRING_CHARACTERS = 20

# Hash buckets out of 100: [0, 80) train, [80, 90) validation, [90, 100) test.
TRAIN_BUCKETS = 80
VALIDATION_BUCKETS = 90


class DataError(ValueError):
    """The data could not be read or has the wrong shape (a user error)."""


@dataclass
class TextDataset:
    """Parallel lists of texts and integer labels, plus the label names."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, count: Optional[int]) -> "TextDataset":
        """The first ``count`` examples (all of them when ``count`` is None)."""
        if count is None or count >= len(self.texts):
            return self
        return TextDataset(self.texts[:count], self.labels[:count], self.label_names)

    def sample(self, count: Optional[int], seed: int) -> "TextDataset":
        """A stratified random sample of ``count`` examples, in the original order.

        Each label keeps its share of the examples (largest-remainder
        rounding), so a sample of a file whose rows are sorted or grouped by
        label still holds every label. The same ``seed`` gives the same sample.
        All examples when ``count`` is None or not smaller than the set.
        """
        if count is None or count >= len(self.texts):
            return self
        by_label: dict[int, list[int]] = {}
        for index, label in enumerate(self.labels):
            by_label.setdefault(label, []).append(index)
        shares = {label: count * len(indices) / len(self.texts)
                  for label, indices in by_label.items()}
        quota = {label: int(share) for label, share in shares.items()}
        by_remainder = sorted(shares, key=lambda label: (quota[label] - shares[label], label))
        for label in by_remainder[:count - sum(quota.values())]:
            quota[label] += 1
        generator = random.Random(seed)
        chosen = sorted(index for label in sorted(by_label)
                        for index in generator.sample(by_label[label], quota[label]))
        return TextDataset([self.texts[index] for index in chosen],
                           [self.labels[index] for index in chosen], self.label_names)


@dataclass
class DataSplits:
    """Train, validation and test sets sharing one label vocabulary."""

    train: TextDataset
    validation: TextDataset
    test: TextDataset
    source: str
    details: dict = field(default_factory=dict)

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names

    def summary(self) -> dict:
        """Sizes and provenance, for reports."""
        return {
            "source": self.source,
            "labels": self.label_names,
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
            **self.details,
        }


def split_bucket(text: str) -> int:
    """A bucket in [0, 100) that depends only on the text's UTF-8 bytes."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def _docstrings_in_source(source: str) -> list[str]:
    """Cleaned docstrings of the module and of every class and function in it."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=True)
            if docstring and len(docstring) >= MINIMUM_DOCSTRING_CHARACTERS:
                found.append(docstring)
    return found


def _package_source_files(stdlib: Path, package: str) -> list[Path]:
    """Sorted .py files of a stdlib package (or module file), tests excluded."""
    directory = stdlib / package
    if directory.is_dir():
        files = sorted(directory.rglob("*.py"))
        # Test suites are not the library's own documentation.
        return [path for path in files
                if "test" not in path.relative_to(directory).parts[:-1]
                and "tests" not in path.relative_to(directory).parts[:-1]
                and not path.name.startswith("test")]
    module = stdlib / f"{package}.py"
    return [module] if module.is_file() else []


def stdlib_docstring_splits(packages: Sequence[str] = STDLIB_PACKAGES,
                            stdlib_directory: Optional[Path] = None) -> DataSplits:
    """The built-in task: stdlib docstrings labeled by their package.

    A text found in two packages is dropped (its label would be ambiguous);
    repeats within one package are kept once. Labels are indexed in the order
    of ``packages``; examples are sorted by text within each split.

    Raises:
        DataError: the stdlib sources are missing (some minimal installs ship
            only bytecode) or a package has no docstrings.
    """
    stdlib = Path(stdlib_directory or sysconfig.get_paths()["stdlib"])
    owners: dict[str, set[str]] = {}
    for package in packages:
        files = _package_source_files(stdlib, package)
        if not files:
            raise DataError(f"no source files for stdlib package {package!r} under the "
                            "stdlib directory; this Python ships without sources, pass --data")
        for path in files:
            try:
                source = path.read_text(encoding="utf-8")
                texts = _docstrings_in_source(source)
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                # A file this interpreter cannot parse (none in a normal
                # install) contributes nothing rather than failing the run.
                continue
            for text in texts:
                owners.setdefault(text, set()).add(package)

    label_index = {package: index for index, package in enumerate(packages)}
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "validation": [], "test": []}
    ambiguous = 0
    for text in sorted(owners):
        if len(owners[text]) > 1:
            ambiguous += 1
            continue
        (package,) = owners[text]
        bucket = split_bucket(text)
        part = ("train" if bucket < TRAIN_BUCKETS
                else "validation" if bucket < VALIDATION_BUCKETS else "test")
        parts[part].append((text, label_index[package]))

    names = list(packages)
    counts = {package: 0 for package in packages}
    for examples in parts.values():
        for _, label in examples:
            counts[names[label]] += 1
    empty = [package for package, count in counts.items() if count == 0]
    if empty:
        raise DataError(f"stdlib packages without usable docstrings: {', '.join(empty)}")

    def dataset(examples):
        return TextDataset([text for text, _ in examples], [label for _, label in examples], names)

    return DataSplits(
        train=dataset(parts["train"]),
        validation=dataset(parts["validation"]),
        test=dataset(parts["test"]),
        source="stdlib-docstrings",
        details={"examples_per_label": counts, "dropped_ambiguous": ambiguous},
    )


def _read_rows(path: Path) -> list[dict]:
    """Rows of a CSV (with header) or JSONL file as dicts.

    Files are UTF-8, with or without the byte order mark Excel writes.
    """
    try:
        return _read_utf8_rows(path)
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise DataError(f"{path}: not UTF-8 text (byte {error.start} is 0x{byte:02x}); "
                        "save the file as UTF-8") from None


def _read_utf8_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {number} is not a JSON object")
                rows.append(row)
        return rows
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            try:
                if reader.fieldnames is None:
                    return []
                return list(reader)
            except csv.Error as error:
                # The csv module's field limit mostly catches an unclosed
                # quote that swallowed the rest of the file.
                hint = (f" (a field longer than {csv.field_size_limit()} characters: "
                        "often an unclosed quote)" if "field larger" in str(error) else "")
                raise DataError(f"{path}: line {reader.line_num}: {error}{hint}") from None
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv or .jsonl")


def _as_number(label) -> Optional[float]:
    """``label`` as a finite number (JSON numbers, or text such as ``"1.0"``), else None."""
    if isinstance(label, bool):
        return None
    try:
        value = float(label)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _indexable_labels(examples: list[tuple[str, object]]) -> tuple[list[tuple[str, str]], list[str]]:
    """Examples with their labels as names, and the sorted label names.

    When every label is a number, equal numbers are one label (JSON ``1`` and
    ``1.0``, CSV ``"1"`` and ``"1.0"``), named in their shortest form and
    ordered by value, so labels 0..K-1 get index == label. Otherwise labels
    are their stripped text, in string order.
    """
    numbers = [_as_number(label) for _, label in examples]
    if all(number is not None for number in numbers):
        def name(number: float) -> str:
            return str(int(number)) if number.is_integer() else repr(number)

        named = [(text, name(number)) for (text, _), number in zip(examples, numbers)]
        return named, [name(number) for number in sorted(set(numbers))]
    named = [(text, str(label).strip()) for text, label in examples]
    return named, sorted({label for _, label in named})


def load_file_splits(path: str | Path) -> DataSplits:
    """A user's CSV or JSONL file with ``text`` and ``label`` columns.

    Labels may be strings or numbers: numbers are indexed in numeric order
    (equal numbers such as ``1`` and ``1.0`` are one label), anything else
    in sorted order of its string form. A label found only in the validation
    or test split is warned about. The split is the same hash split as the built-in task,
    so it does not depend on row order. A file too small to give every split
    an example falls back to using the training set for validation and test
    (reported in ``details``).

    Raises:
        DataError: missing file, unsupported type, missing column, empty text
            or label, or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no examples")
    for column in ("text", "label"):
        if column not in rows[0]:
            present = ", ".join(sorted(map(str, rows[0].keys()))) or "none"
            raise DataError(f"{path}: missing column {column!r} (columns: {present})")

    examples = []
    for number, row in enumerate(rows, start=1):
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: example {number} has an empty or non-string 'text'")
        if label is None or isinstance(label, (dict, list)) or str(label).strip() == "":
            raise DataError(f"{path}: example {number} has an empty or invalid 'label'")
        examples.append((text, label))

    examples, names = _indexable_labels(examples)
    missing = sorted({label for text, label in examples
                      if split_bucket(text) >= TRAIN_BUCKETS}
                     - {label for text, label in examples if split_bucket(text) < TRAIN_BUCKETS},
                     key=names.index)
    if missing:
        warnings.warn(f"{path}: label(s) {', '.join(missing)} occur only in validation/test, "
                      "not in the training split; the model cannot learn them", UserWarning,
                      stacklevel=2)
    if len(names) < 2:
        raise DataError(f"{path}: need at least two distinct labels, found {len(names)}")
    index = {name: position for position, name in enumerate(names)}
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "validation": [], "test": []}
    for text, label in sorted(examples):
        bucket = split_bucket(text)
        part = ("train" if bucket < TRAIN_BUCKETS
                else "validation" if bucket < VALIDATION_BUCKETS else "test")
        parts[part].append((text, index[label]))

    details = {}
    if not parts["train"]:
        raise DataError(f"{path}: too few examples to form a training set")
    for part in ("validation", "test"):
        if not parts[part]:
            parts[part] = list(parts["train"])
            details[f"{part}_is_train"] = True

    def dataset(items):
        return TextDataset([text for text, _ in items], [label for _, label in items], names)

    return DataSplits(dataset(parts["train"]), dataset(parts["validation"]),
                      dataset(parts["test"]), source=str(path), details=details)
