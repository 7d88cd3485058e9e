"""The typed boundary to the core: _core.pyi and the built module agree name for name.

mypy checks the Python layer against the stub, so a field renamed in the bindings but not in
the stub would pass mypy and fail at run time; these tests fail instead. They compare every
function, class, property and parameter (name, keyword-only marker, whether it has a default)
the stub declares with what pybind11 built, and the other way round.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from blob2gpu import _core, errors

STUB = Path(__file__).resolve().parents[2] / "python" / "blob2gpu" / "_core.pyi"
# Dunders the stub declares because callers use them; the rest come from object or pybind11.
DUNDERS = {"__init__", "__dlpack__", "__dlpack_device__"}


def stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text())


def is_typed_dict(node: ast.ClassDef) -> bool:
    return any(isinstance(b, ast.Name) and b.id == "TypedDict" for b in node.bases)


def stub_functions() -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in stub_tree().body if isinstance(n, ast.FunctionDef)}


def stub_classes() -> dict[str, ast.ClassDef]:
    return {
        n.name: n for n in stub_tree().body if isinstance(n, ast.ClassDef) and not is_typed_dict(n)
    }


def stub_constants() -> dict[str, str]:
    """Module-level `NAME: type` declarations: name to the type's name."""
    return {
        n.target.id: ast.unparse(n.annotation)
        for n in stub_tree().body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


def stub_parameters(node: ast.FunctionDef) -> list[tuple[str, bool]]:
    """(name, has a default) per parameter, '*' marking where keyword-only ones start; self
    left out."""
    args = node.args
    positional = args.posonlyargs + args.args
    defaults = [False] * (len(positional) - len(args.defaults)) + [True] * len(args.defaults)
    out = [(a.arg, d) for a, d in zip(positional, defaults, strict=True)]
    if args.kwonlyargs:
        out.append(("*", False))
        out += [
            (a.arg, d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
        ]
    return [p for p in out if p[0] != "self"]


def split_top_level(text: str) -> list[str]:
    parts, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def core_parameters(obj: object) -> list[tuple[str, bool]]:
    """(name, has a default) per parameter from the signature pybind11 writes as the first line
    of the docstring, self left out."""
    first_line = (obj.__doc__ or "").splitlines()[0]
    inside = first_line[first_line.index("(") + 1 : first_line.rindex(") ->")]
    out = []
    for part in split_top_level(inside):
        name = part.split(":")[0].split("=")[0].strip()
        out.append((name, "=" in part and name != "*"))
    return [p for p in out if p[0] != "self"]


def stub_members(node: ast.ClassDef) -> dict[str, str]:
    """{name: 'property' | 'method' | 'class attribute'} declared in a stub class."""
    members = {}
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            decorators = {d.id for d in item.decorator_list if isinstance(d, ast.Name)}
            members[item.name] = "property" if "property" in decorators else "method"
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            members[item.target.id] = "class attribute"
    return members


def core_kind(cls: type, name: str) -> str:
    attribute = inspect.getattr_static(cls, name)
    if isinstance(attribute, property):
        # def_property_readonly_static: a property of the class itself, read on the class.
        return (
            "class attribute"
            if type(attribute).__name__ == "pybind11_static_property"
            else ("property")
        )
    return "method" if callable(attribute) else "class attribute"


def core_public_names() -> set[str]:
    return {n for n in dir(_core) if not n.startswith("_")}


def test_the_installed_package_ships_the_stub_next_to_the_extension() -> None:
    installed = Path(_core.__file__).with_name("_core.pyi")
    assert installed.read_text() == STUB.read_text()
    assert Path(_core.__file__).with_name("py.typed").exists()


def test_every_name_the_module_exports_is_in_the_stub() -> None:
    declared = set(stub_functions()) | set(stub_classes()) | set(stub_constants())
    assert core_public_names() - declared == set(), "exported by _core but missing in _core.pyi"


def test_every_name_the_stub_declares_exists_with_the_same_kind() -> None:
    for name in stub_functions():
        assert inspect.isbuiltin(getattr(_core, name, None)), f"_core.{name} is not a function"
    for name in stub_classes():
        assert isinstance(getattr(_core, name, None), type), f"_core.{name} is not a class"
    for name, kind in stub_constants().items():
        assert type(getattr(_core, name, None)).__name__ == kind, f"_core.{name} is not a {kind}"


def test_typed_dicts_in_the_stub_are_stub_only_names() -> None:
    typed_dicts = [
        n.name for n in stub_tree().body if isinstance(n, ast.ClassDef) and is_typed_dict(n)
    ]
    assert typed_dicts, "the stub describes parse_header()'s result as a TypedDict"
    assert core_public_names() & set(typed_dicts) == set()


@pytest.mark.parametrize("name", sorted(stub_functions()))
def test_function_parameters_match(name: str) -> None:
    assert core_parameters(getattr(_core, name)) == stub_parameters(stub_functions()[name])


@pytest.mark.parametrize("name", sorted(stub_classes()))
def test_class_members_match(name: str) -> None:
    cls = getattr(_core, name)
    declared = stub_members(stub_classes()[name])
    built = {
        member: core_kind(cls, member)
        for member, attribute in vars(cls).items()
        if (not member.startswith("_") or member in DUNDERS)
        # A class bound without a constructor keeps a slot wrapper that only raises TypeError.
        and type(attribute).__name__ != "wrapper_descriptor"
    }
    assert declared == built


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (name, member)
        for name, node in sorted(stub_classes().items())
        for member, kind in stub_members(node).items()
        if kind == "method"
    ],
)
def test_method_parameters_match(cls: str, method: str) -> None:
    node = next(
        item
        for item in stub_classes()[cls].body
        if isinstance(item, ast.FunctionDef) and item.name == method
    )
    built = inspect.getattr_static(getattr(_core, cls), method)
    assert core_parameters(built) == stub_parameters(node)


def test_a_shard_source_keeps_what_it_was_given() -> None:
    sums = _core.ChunkChecksums(4096, crc32c=[1, 2])
    source = _core.ShardSource(
        "a.safetensors", size=5000, path="/x", checksums=sums, content_md5=bytes(range(16))
    )
    assert (source.name, source.size, source.path) == ("a.safetensors", 5000, "/x")
    assert source.checksums is not None and source.checksums.crc32c == [1, 2]
    assert source.checksums.chunk_bytes == 4096 and source.checksums.sha256 == []
    assert source.content_md5 == bytes(range(16))
    bare = _core.ShardSource("b.safetensors")
    assert (bare.size, bare.path, bare.checksums, bare.content_md5) == (0, "", None, None)
    digests = [bytes([i]) * 32 for i in range(3)]
    assert _core.ChunkChecksums(8, sha256=digests).sha256 == digests


def test_malformed_shard_inputs_raise_invalid_argument() -> None:
    with pytest.raises(errors.InvalidArgument, match="Content-MD5 must be 16 bytes"):
        _core.ShardSource("a", content_md5=b"short")
    with pytest.raises(errors.InvalidArgument, match="SHA-256 chunk digest must be 32 bytes"):
        _core.ChunkChecksums(8, sha256=[b"x" * 31])
    with pytest.raises(errors.InvalidArgument, match="chunk_bytes > 0"):
        _core.ChunkChecksums(0, crc32c=[1])
