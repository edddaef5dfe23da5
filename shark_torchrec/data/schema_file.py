"""Click-log schemas written in a file (YAML or JSON): what ``--data csv --schema FILE`` reads.

A schema file describes the layout of your delimited click logs and how many embedding rows
each field gets; :func:`load_schema_file` turns it into a
:class:`~shark_torchrec.data.schema.ClickLogSchema` plus the rows per field.  Every key::

    # clicks.schema.yaml
    delimiter: ","            # the column separator; "\\t" or "tab" for tab-separated files
    header: true              # true: each file's first line names the columns (any order);
                              # false: no header, give `columns`; auto: a file has a header
                              # exactly when its first line holds the label column's name
    columns: [ts, clicked, user, item, price, tags]   # the columns in file order (header false/auto)
    label: clicked            # the 0/1 label column (required)
    dense: [price]            # numeric columns, in model order (default: none)
    dense_transform: log1p    # log1p (log(1 + max(x, 0)), the default) or none
    encoding: hash            # default for the fields below: hash (default), hex or int
    num_embeddings: 100000    # default rows per field (else the recipes' --num_embeddings)
    missing_as_empty: false   # an empty cell is an empty bag (true) or the value "0" (false)
    categorical:              # single-valued fields (at least one field in all)
      user: 1000000           # shorthand for {num_embeddings: 1000000}
      item: {encoding: int, num_embeddings: 50001}   # ids 0..50000, one row each
      country: {vocabulary: [de, fr, us]}            # rows 0..2; row 3 for any other value
    multi_valued:             # fields with several values in one cell
      tags: {separator: "|", num_embeddings: 10000}

``categorical`` may also be a plain list of column names.  Columns of the files that the
schema does not name (``ts`` above) are ignored.  A field's rows: its own ``num_embeddings``,
else ``len(vocabulary) + 1`` for a vocabulary, else the top-level ``num_embeddings``, else the
recipe's ``--num_embeddings`` (``--num_embeddings_per_feature`` replaces them all).

Errors are :class:`SchemaFileError` and name the file, the line and the key path, e.g.
``clicks.schema.yaml:9: categorical.item.encoding: expected one of hash, hex, int, got 'decimal'``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import yaml

from shark_torchrec.data.schema import ClickLogSchema
from shark_torchrec.errors import SharkInputError

__all__ = ["SchemaFile", "SchemaFileError", "load_schema_file", "parse_schema_document"]

_TOP_KEYS = ("delimiter", "header", "columns", "label", "dense", "dense_transform", "encoding",
             "num_embeddings", "missing_as_empty", "categorical", "multi_valued")
_FIELD_KEYS = ("num_embeddings", "encoding", "vocabulary")
_FILE_ENCODINGS = ("hash", "hex", "int")  # "vocab" is implied by a vocabulary
_DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|",
                    "space": " "}


class SchemaFileError(SharkInputError, ValueError):
    """A schema file that cannot be used; the message names file, line and key path."""


@dataclass(frozen=True)
class SchemaFile:
    """A loaded schema file.

    Attributes:
        path: where it was read from.
        schema: the layout, for :class:`~shark_torchrec.data.click_log.ClickLogDataset`.
        num_embeddings: rows per sparse feature, in feature order; ``None`` where the file
            leaves it to the caller's default.
    """

    path: str
    schema: ClickLogSchema
    num_embeddings: Tuple[Optional[int], ...]

    def sizes(self, default: int) -> List[int]:
        """Rows per feature, ``default`` where the file gives none."""
        return [default if n is None else n for n in self.num_embeddings]


def load_schema_file(path: str) -> SchemaFile:
    """Read and validate a YAML or JSON schema file (see the module docstring)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SchemaFileError(f"{path}: cannot read the schema file ({e})") from e
    doc, lines, texts = _parse(text, path)
    return parse_schema_document(doc, source=path, lines=lines, texts=texts)


def _parse(text: str, path: str) -> Tuple[Any, Dict[Tuple, int], Dict[Tuple, str]]:
    """The document, the line of every key path (``()`` for the top level) and the text of
    every scalar as written (YAML turns ``01`` into 1 and ``no`` into False)."""
    if path.endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if not path.endswith(".json"):
            doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if path.endswith(".json"):
            return doc, {}, {}  # valid JSON that PyYAML (YAML 1.1) refuses: no line numbers then
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e)
        column = f", column {mark.column + 1}" if mark is not None else ""
        raise SchemaFileError(f"{where}: not valid YAML ({problem}{column})") from e
    lines: Dict[Tuple, int] = {}
    texts: Dict[Tuple, str] = {}
    if node is not None:
        _walk(node, (), lines, texts, path)
    if path.endswith(".json"):
        texts = {}  # JSON's types are what they look like
    return doc, lines, texts


def _walk(node: yaml.Node, at: Tuple, lines: Dict[Tuple, int], texts: Dict[Tuple, str],
          path: str) -> None:
    lines.setdefault(at, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        texts[at] = node.value
    elif isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:  # YAML would keep the last one silently
                raise SchemaFileError(
                    f"{path}:{key_node.start_mark.line + 1}: {_dotted((*at, key))}: key given twice"
                )
            seen.add(key)
            lines[(*at, key)] = key_node.start_mark.line + 1
            _walk(value_node, (*at, key), lines, texts, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*at, i), lines, texts, path)


def _dotted(at: Tuple) -> str:
    return ".".join(f"[{k}]" if isinstance(k, int) else str(k) for k in at).replace(".[", "[") or "top level"


class _Checker:
    def __init__(self, source: str, lines: Dict[Tuple, int], texts: Dict[Tuple, str]) -> None:
        self.source, self.lines, self.texts = source, lines, texts

    def fail(self, at: Tuple, problem: str) -> None:
        line = None
        for i in range(len(at), -1, -1):  # the nearest enclosing key with a known line
            line = self.lines.get(tuple(at[:i]))
            if line is not None:
                break
        where = f"{self.source}:{line}" if line is not None else self.source
        raise SchemaFileError(f"{where}: {_dotted(at)}: {problem}")

    def string(self, value: Any, at: Tuple) -> str:
        if not isinstance(value, str) or not value:
            self.fail(at, f"expected a non-empty string, got {value!r}")
        return value

    def names(self, value: Any, at: Tuple) -> List[str]:
        if not isinstance(value, list):
            self.fail(at, f"expected a list of column names, got {value!r}")
        out = [self.string(v, (*at, i)) for i, v in enumerate(value)]
        for i, v in enumerate(out):
            if v in out[:i]:
                self.fail((*at, i), f"column {v!r} listed twice")
        return out

    def rows(self, value: Any, at: Tuple) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self.fail(at, f"expected a positive integer (embedding rows), got {value!r}")
        return value

    def choice(self, value: Any, at: Tuple, choices: Tuple[str, ...]) -> str:
        if value not in choices:
            self.fail(at, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def mapping(self, value: Any, at: Tuple, known: Optional[Tuple[str, ...]], what: str) -> Dict[str, Any]:
        """``value`` if it is a mapping whose keys are all ``known`` (any keys if ``None``)."""
        if not isinstance(value, dict):
            self.fail(at, f"expected a mapping of {what}, got {value!r}")
        for key in value:
            if known is not None and key not in known:
                self.fail((*at, key), f"unknown key (known: {', '.join(known)})")
        return value

    def text(self, value: Any, at: Tuple) -> str:
        """A value compared with the text of cells: as written in the file."""
        text = self.texts.get(at)
        if text is None and isinstance(value, (str, int)) and not isinstance(value, bool):
            text = str(value)
        if not text or isinstance(value, (list, dict)):
            self.fail(at, f"expected a non-empty value, got {value!r}")
        return text


def _sparse_fields(c: "_Checker", doc: Dict[str, Any], delimiter: str):
    """The ``categorical`` and ``multi_valued`` columns: ``[(column, key path, settings)]`` in
    file order of the schema, and each multi-valued column's separator."""
    fields: List[Tuple[str, Tuple, Dict[str, Any]]] = []  # (column, key path, settings)
    categorical = doc.get("categorical") or {}
    if isinstance(categorical, list):
        fields += [(name, ("categorical", i), {}) for i, name in
                   enumerate(c.names(categorical, ("categorical",)))]
    else:
        c.mapping(categorical, ("categorical",), None, "column names to settings")
        for name, settings in categorical.items():
            at = ("categorical", name)
            c.string(name, at)
            if settings is None:
                settings = {}
            elif isinstance(settings, int) and not isinstance(settings, bool):
                settings = {"num_embeddings": settings}
            fields.append((name, at, c.mapping(settings, at, _FIELD_KEYS, "field settings")))
    multi = doc.get("multi_valued") or {}
    c.mapping(multi, ("multi_valued",), None, "column names to settings")
    separators: Dict[str, str] = {}
    for name, settings in multi.items():
        at = ("multi_valued", name)
        c.string(name, at)
        c.mapping(settings, at, (*_FIELD_KEYS, "separator"), "field settings")
        if "separator" not in settings:
            c.fail((*at, "separator"), "missing (required: the separator between the values of a cell)")
        sep = c.string(settings["separator"], (*at, "separator"))
        if sep == delimiter:
            c.fail((*at, "separator"), f"{sep!r} is also the column delimiter")
        separators[name] = sep
        fields.append((name, at, settings))
    return fields, separators


def _field_settings(c: "_Checker", fields, used: Dict[str, Tuple], default_rows: Optional[int]):
    """Each sparse field's encoding, vocabulary and rows (checked; ``used`` gains its column)."""
    encodings: Dict[str, str] = {}
    vocabularies: Dict[str, List[str]] = {}
    rows: List[Optional[int]] = []
    for name, at, settings in fields:
        if name in used:
            c.fail(at, f"column {name!r} is already used by {_dotted(used[name])}")
        used[name] = at
        n = c.rows(settings["num_embeddings"], (*at, "num_embeddings")) if "num_embeddings" in settings else None
        if "encoding" in settings:
            encodings[name] = c.choice(settings["encoding"], (*at, "encoding"), _FILE_ENCODINGS)
        if "vocabulary" in settings:
            if "encoding" in settings:
                c.fail((*at, "encoding"), "a field with a vocabulary is encoded by it: drop 'encoding'")
            vocab = settings["vocabulary"]
            if not isinstance(vocab, list) or not vocab:
                c.fail((*at, "vocabulary"), f"expected a non-empty list of values, got {vocab!r}")
            # YAML reads `[01, 02]` and `[yes, no]` as numbers and booleans; cells are text, so
            # each value is taken as the text it was written as.
            values = [c.text(v, (*at, "vocabulary", i)) for i, v in enumerate(vocab)]
            for i, v in enumerate(values):
                if v in values[:i]:
                    c.fail((*at, "vocabulary", i), f"value {v!r} listed twice")
            vocabularies[name] = values
            if n is None:
                n = len(values) + 1
            elif n < len(values) + 1:
                c.fail((*at, "num_embeddings"), f"{n} rows for a vocabulary of {len(values)} values: "
                       f"at least {len(values) + 1} (one row for values outside it)")
        rows.append(n if n is not None else default_rows)
    return encodings, vocabularies, rows


def parse_schema_document(doc: Any, source: str = "schema",
                          lines: Optional[Dict[Tuple, int]] = None,
                          texts: Optional[Dict[Tuple, str]] = None) -> SchemaFile:
    """Validate an already parsed schema document (see :func:`load_schema_file`).

    ``lines`` maps key paths to line numbers for the error messages; ``texts`` key paths to
    the text of scalars as written (vocabulary values are compared as text).
    """
    c = _Checker(source, lines or {}, texts or {})
    if doc is None:
        c.fail((), "the schema file is empty")
    c.mapping(doc, (), _TOP_KEYS, "schema keys")
    for key in ("label", "categorical"):
        if key not in doc and not (key == "categorical" and doc.get("multi_valued")):
            c.fail((key,), "missing (required)")

    delimiter = doc.get("delimiter", ",")
    if not isinstance(delimiter, str) or not delimiter:
        c.fail(("delimiter",), f"expected a non-empty string, got {delimiter!r}")
    delimiter = _DELIMITER_NAMES.get(delimiter, delimiter)
    header = doc.get("header", True)
    if header not in (True, False, "auto"):
        c.fail(("header",), f"expected true, false or auto, got {header!r}")
    columns = c.names(doc["columns"], ("columns",)) if "columns" in doc else None
    if header is not True and not columns:
        c.fail(("columns",), f"needed with header: {str(header).lower()} (the columns in file order)")
    label = c.string(doc["label"], ("label",))
    dense = c.names(doc.get("dense") or [], ("dense",))
    dense_transform = c.choice(doc.get("dense_transform", "log1p"), ("dense_transform",), ("log1p", "none"))
    default_encoding = c.choice(doc.get("encoding", "hash"), ("encoding",), _FILE_ENCODINGS)
    default_rows = c.rows(doc["num_embeddings"], ("num_embeddings",)) if "num_embeddings" in doc else None
    missing_as_empty = doc.get("missing_as_empty", False)
    if not isinstance(missing_as_empty, bool):
        c.fail(("missing_as_empty",), f"expected true or false, got {missing_as_empty!r}")

    fields, separators = _sparse_fields(c, doc, delimiter)
    used: Dict[str, Tuple] = {label: ("label",)}
    for i, name in enumerate(dense):
        if name in used:
            c.fail(("dense", i), f"column {name!r} is already the {_dotted(used[name])}")
        used[name] = ("dense", i)
    encodings, vocabularies, rows = _field_settings(c, fields, used, default_rows)
    if not fields:
        c.fail(("categorical",), "no sparse fields: name at least one categorical or multi_valued column")
    if columns is not None:
        missing = [name for name in used if name not in columns]
        if missing:
            c.fail(("columns",), f"does not list the columns {missing} that the schema uses")

    n_single = sum(1 for _, at, _ in fields if at[0] == "categorical")
    try:
        schema = ClickLogSchema(
            label=label, dense=dense, categorical=[name for name, _, _ in fields[:n_single]],
            multi_valued=separators, delimiter=delimiter, has_header=header, column_names=columns,
            categorical_encoding=default_encoding, dense_transform=dense_transform,
            missing_as_empty=missing_as_empty, encodings=encodings, vocabularies=vocabularies,
        )
    except ValueError as e:  # anything the checks above did not catch first
        c.fail((), str(e))
    return SchemaFile(path=source, schema=schema, num_embeddings=tuple(rows))


def write_schema_file(path: str, doc: Dict[str, Any], comment: str = "") -> None:
    """Write ``doc`` (the document form, see the module docstring) as YAML, after checking it
    loads (so a written schema always reads back)."""
    parse_schema_document(doc, source=path)
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100)
    head = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(head + text)
    os.replace(tmp, path)
