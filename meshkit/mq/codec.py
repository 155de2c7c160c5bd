"""Payload codecs: JSON (default), Thrift structs (binary protocol) and raw bytes.

A subscription's ``model`` picks its codec (:func:`codec_for`); a published value picks
one by its type (:func:`codec_for_value`). A payload that does not decode raises
:class:`~meshkit.mq.errors.DecodeError`, which sends the message to the dead-letter
topic. Any object with ``encode(value) -> bytes`` and ``decode(bytes) -> value`` is a
codec too.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol, runtime_checkable

from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.utils import deserialize, serialize

from .errors import DecodeError

__all__ = ["Codec", "JsonCodec", "RawCodec", "ThriftCodec", "codec_for", "codec_for_value"]


@runtime_checkable
class Codec(Protocol):
    """Turns a value into message bytes and back."""

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes | None) -> Any: ...


def _is_pydantic_model(cls: Any) -> bool:
    return isinstance(cls, type) and hasattr(cls, "model_validate_json")


def _is_thrift_struct(cls: Any) -> bool:
    return isinstance(cls, type) and hasattr(cls, "thrift_spec")


class RawCodec:
    """Bytes in, bytes out (``str`` is encoded as UTF-8 on the way in)."""

    def encode(self, value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, str):
            return value.encode()
        raise TypeError(f"expected bytes or str for a raw payload, found {type(value).__name__}")

    def decode(self, data: bytes | None) -> bytes:
        return b"" if data is None else data

    def __repr__(self) -> str:
        return "RawCodec()"


class JsonCodec:
    """JSON, decoded into ``model`` when one is given.

    ``model``: a pydantic v2 model (validated with ``model_validate_json``), a dataclass
    (built from the decoded object's fields), ``dict``/``list``/``str``/``int``/``float``
    (checked), or ``None`` (whatever the JSON holds).
    """

    def __init__(self, model: Any = None) -> None:
        if model is not None and not (
            _is_pydantic_model(model)
            or dataclasses.is_dataclass(model)
            or model in (dict, list, str, int, float, bool)
        ):
            raise TypeError(
                "expected a pydantic model, a dataclass or a JSON type for a JSON payload, "
                f"found {model!r}"
            )
        self.model = model

    def encode(self, value: Any) -> bytes:
        if hasattr(value, "model_dump_json"):
            return value.model_dump_json().encode()  # type: ignore[no-any-return]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"expected a JSON-serialisable value, found {value!r}: {exc}") from exc

    def decode(self, data: bytes | None) -> Any:
        model = self.model
        if data is None:
            raise DecodeError("expected a JSON payload, found an empty (null) message value")
        if _is_pydantic_model(model):
            try:
                return model.model_validate_json(data)
            except ValueError as exc:  # pydantic.ValidationError is a ValueError
                raise DecodeError(f"payload is not a valid {model.__name__}: {exc}") from exc
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"expected a JSON payload, found {_preview(data)}: {exc}") from exc
        if model is None:
            return obj
        if isinstance(model, type) and dataclasses.is_dataclass(model):
            if not isinstance(obj, dict):
                raise DecodeError(
                    f"expected a JSON object for {model.__name__}, found {type(obj).__name__}"
                )
            try:
                return model(**obj)  # type: ignore[operator]
            except TypeError as exc:
                raise DecodeError(f"payload does not fit {model.__name__}: {exc}") from exc
        if not isinstance(obj, model) or (model in (int, float) and isinstance(obj, bool)):
            raise DecodeError(f"expected a JSON {model.__name__}, found {type(obj).__name__}")
        return obj

    def __repr__(self) -> str:
        return f"JsonCodec({getattr(self.model, '__name__', self.model)})"


class ThriftCodec:
    """A Thrift struct in the binary protocol (thriftpy2, Cython when available)."""

    def __init__(self, struct: type) -> None:
        if not _is_thrift_struct(struct):
            raise TypeError(f"expected a thriftpy2 struct class, found {struct!r}")
        self.struct = struct
        self._factory = TBinaryProtocolFactory()

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, self.struct):
            raise TypeError(
                f"expected a {self.struct.__name__} to encode, found {type(value).__name__}"
            )
        return serialize(value, self._factory)  # type: ignore[no-any-return]

    def decode(self, data: bytes | None) -> Any:
        if data is None:
            raise DecodeError(f"expected a {self.struct.__name__}, found an empty message value")
        try:
            return deserialize(self.struct(), data, self._factory)
        except Exception as exc:  # thriftpy2 raises assorted errors on garbage
            raise DecodeError(
                f"payload is not a Thrift {self.struct.__name__} ({_preview(data)}): {exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"ThriftCodec({self.struct.__name__})"


_RAW = RawCodec()
_JSON = JsonCodec()


def codec_for(model: Any = None, codec: Codec | None = None) -> Codec:
    """The codec a subscription uses: ``codec`` when given, else one fitting ``model``."""
    if codec is not None:
        if not isinstance(codec, Codec):
            raise TypeError(f"expected a codec with encode() and decode(), found {codec!r}")
        return codec
    if model is None:
        return _JSON
    if model is bytes:
        return _RAW
    if _is_thrift_struct(model):
        return ThriftCodec(model)
    return JsonCodec(model)


def codec_for_value(value: Any) -> Codec:
    """The codec a published value uses: raw for bytes, Thrift for structs, else JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _RAW
    if _is_thrift_struct(type(value)):
        return ThriftCodec(type(value))
    return _JSON


def _preview(data: bytes, limit: int = 40) -> str:
    return repr(data[:limit]) + ("…" if len(data) > limit else "")
