"""The deployment contract: everything a device needs to turn model outputs into a diagnosis.

Task names and kinds, class lists, the diagnosis vocabulary, preprocessing, input/output tensor names,
model name/version and weight hashes. It is written into the ONNX metadata (key `fundus_mtkd.contract`)
and into a JSON sidecar next to every model file, and checked against the model when it is loaded.

The one API every stage uses: `Contract.derive` (a flavour or engine made from a model),
`write_metadata` / `read_metadata` (inside an ONNX file), `write_sidecar` / `read_sidecar` (next to it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from deploy.errors import UserError
from deploy.fileio import atomic_write_text
from deploy.preprocess import PreprocessSpec
from deploy.vocab import Vocabulary

CONTRACT_VERSION = 1
METADATA_KEY = "fundus_mtkd.contract"
INPUT_NAME = "image"
TASK_KINDS = ("classification", "text")


class ContractError(UserError):
    """A contract that is malformed or does not match its model."""


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ContractError(f"{where} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task. Classification tasks carry their ordered class list.

    `ordinal`: the classes are grades in order (DR grade 0-4, oedema risk 0-2), so a prediction one grade
    off is less wrong than three off; such tasks are scored with quadratic-weighted kappa as well.
    """

    name: str
    kind: str
    classes: tuple[str, ...] = ()
    description: str = ""
    ordinal: bool = False
    normal: str | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ContractError(f"task name {self.name!r} must be a Python identifier (letters, digits, _)")
        if self.kind not in TASK_KINDS:
            raise ContractError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.kind == "classification":
            if len(self.classes) < 2:
                raise ContractError(f"task {self.name!r}: a classification task needs >= 2 classes")
            if len(set(self.classes)) != len(self.classes):
                raise ContractError(f"task {self.name!r}: duplicate class names")
            if self.normal is not None and self.normal not in self.classes:
                raise ContractError(f"task {self.name!r}: normal class {self.normal!r} is not one of its classes "
                                    f"{list(self.classes)}; name one of them or remove `normal:`")
        elif self.classes or self.ordinal or self.normal is not None:
            raise ContractError(f"task {self.name!r}: a text task has no class list, is not ordinal and has no "
                                "normal class")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def output_name(self) -> str:
        """Name of the model output: class probabilities or generated token ids."""
        return f"{self.name}_probs" if self.kind == "classification" else f"{self.name}_tokens"

    def to_dict(self) -> dict:
        data = {"name": self.name, "kind": self.kind, "description": self.description}
        if self.kind == "classification":
            data["classes"] = list(self.classes)
        if self.ordinal:  # written only when set, so contracts of nominal tasks stay byte-identical
            data["ordinal"] = True
        if self.normal is not None:  # likewise
            data["normal"] = self.normal
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        data = _mapping(data, "a task")
        unknown = set(data) - {"name", "kind", "classes", "description", "ordinal", "normal"}
        if unknown:
            raise ContractError(f"task {data.get('name')!r}: unknown keys {sorted(unknown)}")
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            classes=tuple(str(c) for c in data.get("classes", ())),
            description=str(data.get("description", "")),
            ordinal=_flag(data.get("ordinal", False), f"task {data.get('name')!r}: ordinal"),
            normal=None if data.get("normal") is None else str(data["normal"]),
        )


@dataclass
class Contract:
    """The full deployment contract of one model file."""

    model_name: str
    model_version: str
    tasks: list[TaskSpec]
    preprocessing: PreprocessSpec
    vocabulary: Vocabulary | None = None
    input_name: str = INPUT_NAME
    hashes: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        if not names:
            raise ContractError("a contract needs at least one task")
        if len(set(names)) != len(names):
            raise ContractError(f"duplicate task names in {names}")
        if any(t.kind == "text" for t in self.tasks) and self.vocabulary is None:
            raise ContractError("a model with a text task needs the vocabulary in its contract")

    @property
    def output_names(self) -> list[str]:
        return [t.output_name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; tasks are {[t.name for t in self.tasks]}")

    def to_dict(self) -> dict:
        return {
            "contract_version": CONTRACT_VERSION,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "input_name": self.input_name,
            "output_names": self.output_names,
            "tasks": [t.to_dict() for t in self.tasks],
            "preprocessing": self.preprocessing.to_dict(),
            "vocabulary": self.vocabulary.to_dict() if self.vocabulary else None,
            "hashes": dict(self.hashes),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Contract:
        data = _mapping(data, "the contract")
        version = data.get("contract_version")
        if version != CONTRACT_VERSION:
            raise ContractError(f"contract version {version!r} is not supported (expected {CONTRACT_VERSION})")
        known = {"contract_version", "model_name", "model_version", "input_name", "output_names", "tasks",
                 "preprocessing", "vocabulary", "hashes", "extra"}
        unknown = set(data) - known
        if unknown:
            raise ContractError(f"unknown contract keys {sorted(unknown)}")
        contract = cls(
            model_name=str(data["model_name"]),
            model_version=str(data["model_version"]),
            tasks=[TaskSpec.from_dict(t) for t in _sequence(data["tasks"], "tasks")],
            preprocessing=PreprocessSpec.from_dict(_mapping(data["preprocessing"], "preprocessing")),
            vocabulary=Vocabulary.from_dict(_mapping(data["vocabulary"], "vocabulary")) if data.get("vocabulary")
            else None,
            input_name=str(data.get("input_name", INPUT_NAME)),
            hashes=dict(_mapping(data.get("hashes") or {}, "hashes")),
            extra=dict(_mapping(data.get("extra") or {}, "extra")),
        )
        if "output_names" in data and list(_sequence(data["output_names"], "output_names")) != contract.output_names:
            raise ContractError(f"output_names {data['output_names']} do not match the tasks")
        return contract

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, source: str = "contract") -> Contract:
        try:
            return cls.from_dict(json.loads(text))
        except ContractError as exc:
            raise ContractError(f"{source}: not a valid fundus-mtkd contract ({exc}); re-export the model "
                                "(make export) or restore its .json sidecar") from exc
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ContractError(f"{source}: not a valid fundus-mtkd contract ({what}); re-export the model "
                                "(make export) or restore its .json sidecar") from exc

    def derive(self, **extra: object) -> Contract:
        """The contract of a model made from this one (a reduced-precision flavour, an engine): the same
        tasks, preprocessing, vocabulary and hashes, with provenance (`precision`, build facts) added."""
        return dataclasses.replace(self, tasks=list(self.tasks), hashes=dict(self.hashes),
                                   extra={**self.extra, **extra})

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Contract:
        path = Path(path)
        if not path.is_file():
            raise ContractError(f"{path}: contract sidecar not found; re-export the model (make export)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ContractError(f"{path}: unreadable contract sidecar ({exc}); re-export the model") from exc
        return cls.from_json(text, source=str(path))


def _mapping(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise ContractError(f"{what} must be a JSON object, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _sequence(value: object, what: str) -> list:
    if not isinstance(value, list):
        raise ContractError(f"{what} must be a JSON list, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def sidecar_path(model_path: str | Path) -> Path:
    """The JSON sidecar next to a model file: model.onnx -> model.json, model.engine -> model.json."""
    return Path(model_path).with_suffix(".json")


def write_sidecar(model_path: str | Path, contract: Contract) -> Path:
    """Write `contract` as the sidecar of `model_path` (atomically); returns the sidecar's path."""
    return contract.save(sidecar_path(model_path))


def read_sidecar(model_path: str | Path) -> Contract:
    """The contract in the sidecar of `model_path`; ContractError naming the fix when missing/invalid."""
    return Contract.load(sidecar_path(model_path))


def write_metadata(model, contract: Contract) -> None:
    """Write the contract (and model name/version) into an ONNX ModelProto's metadata_props, replacing
    older values. Duck-typed on `metadata_props`, so deploy/ needs no `onnx` package."""
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update({METADATA_KEY: contract.to_json(), "model_name": contract.model_name,
                 "model_version": contract.model_version})
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)


def read_metadata(metadata: dict[str, str], source: str) -> Contract | None:
    """The contract embedded in ONNX metadata_props (a {key: value} map), or None when it has none."""
    text = metadata.get(METADATA_KEY)
    return None if text is None else Contract.from_json(text, source=f"{source} (metadata {METADATA_KEY})")
