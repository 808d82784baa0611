"""The repository's ``gitops.yaml`` and ``vars/*.yaml``: frozen classes, file:line errors.

For: turning the YAML text of ``gitops.yaml`` into a ``RepoConfig`` that is valid by
construction (unknown keys rejected with a "did you mean" hint, every error one line
naming file and line), parsing ``vars/<host>.yaml`` / ``vars/group_<name>.yaml``, and
merging one host's variables in the documented order.

Not for: reading git or the disk (``render.py`` passes the bytes in) or rendering
Jinja (``dest`` and command strings stay templates here; ``render.py`` renders them
per host). ``schemas/gitops.schema.json`` is the documented contract; jsonschema is
not used at run time. The classes check what the schema says plus what a schema
cannot (references to declared hosts and groups); a test keeps the two in agreement.

Variable precedence, lowest first (mappings merge key by key, anything else replaces):

1. ``vars:`` in gitops.yaml (every host)
2. for each group in the order the host lists them: ``vars/group_<name>.yaml``, then
   ``groups.<name>.vars``
3. ``vars/<host>.yaml``
4. ``hosts.<host>.vars``
"""

from __future__ import annotations

import copy
import difflib
import logging
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import yaml

from applier.errors import ManifestError
from applier.manifest import (
    DRIFT_POLICIES,
    MAX_COMMAND_TIMEOUT,
    Command,
    DriftPolicy,
    check_target_path,
)
from bundler.errors import RepoConfigError

logger = logging.getLogger(__name__)

CONFIG_NAME = "gitops.yaml"
CONFIG_VERSION = 1
VARS_DIR = "vars"
TEMPLATE_SUFFIX = ".j2"
# Names the renderer gives every template; a variable of the same name would be
# silently shadowed, so it is an error instead.
RESERVED_VARS = frozenset({"host", "groups", "hosts", "hostvars"})

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10}")
_MODE = re.compile(r"[0-7]{3,4}")
_COMMAND_FIELDS = ("validate", "check", "on_change", "health")
_TOP_KEYS = {"version": True, "vars": False, "groups": False, "hosts": True, "files": True}
_GROUP_KEYS = {"description": False, "vars": False}
_HOST_KEYS = {"groups": False, "vars": False}
_FILE_KEYS = {
    "src": True, "dest": True, "hosts": False, "groups": False, "mode": False,
    "owner": False, "group": False, "validate": False, "check": False, "on_change": False,
    "health": False, "drift": False,
}
_COMMAND_KEYS = {"run": True, "timeout": False, "retries": False, "delay": False}


def host_vars_path(host: str) -> str:
    """Where a host's own vars file lives, relative to the directory of gitops.yaml."""
    return f"{VARS_DIR}/{host}.yaml"


def group_vars_path(group: str) -> str:
    return f"{VARS_DIR}/group_{group}.yaml"


# -- YAML with line numbers ---------------------------------------------------------------


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers its own line and the line of each key."""

    line: int = 0
    key_lines: dict[Any, int]


class _Seq(list[Any]):
    """A YAML sequence that remembers its own line and the line of each item."""

    line: int = 0
    item_lines: list[int]


# libyaml's parser is ~10x faster on a config with thousands of hosts and reports the
# same marks; the pure-Python one is the fallback where PyYAML was built without it.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(_BaseLoader):  # type: ignore[misc,valid-type]
    """SafeLoader whose mappings and sequences carry 1-based line numbers."""

    display = CONFIG_NAME


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Iterator[_Map]:
    result = _Map()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    yield result
    own = sum(1 for k, _ in node.value if k.tag != _MERGE_TAG)
    loader.flatten_mapping(node)
    merged = len(node.value) - own  # flatten_mapping puts `<<:` pairs first
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError as e:
            raise RepoConfigError(f"{loader.display}:{line}: a mapping key must be a "
                                  "scalar") from e
        # PyYAML keeps the last of two equal keys; a typo'd copy would silently win.
        if i >= merged and key in result and result.key_lines[key] > 0:
            raise RepoConfigError(f"{loader.display}:{line}: duplicate key {key!r} "
                                  f"(first at line {result.key_lines[key]})")
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line if i >= merged else -line


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> Iterator[_Seq]:
    result = _Seq()
    result.line = node.start_mark.line + 1
    result.item_lines = []
    yield result
    for item in node.value:
        result.append(loader.construct_object(item, deep=True))
        result.item_lines.append(item.start_mark.line + 1)


def _refuse_set(loader: _LineLoader, node: yaml.Node) -> None:
    # A set's order follows Python's string hashing, which changes from run to run:
    # two builds of one commit would differ.
    raise RepoConfigError(f"{loader.display}:{node.start_mark.line + 1}: a !!set has no "
                          "fixed order (bundles must be reproducible): use a list")


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)
_LineLoader.add_constructor("tag:yaml.org,2002:set", _refuse_set)


def load_yaml(data: bytes | str, path: str) -> Any:
    """Parse one YAML document; errors name ``path`` and the line."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RepoConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"
                                  ) from e
    loader = _LineLoader(data)
    loader.display = path
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = e.problem or e.context or "invalid YAML"
        raise RepoConfigError(f"{path}:{line}: invalid YAML: {problem}") from e
    except yaml.YAMLError as e:
        raise RepoConfigError(f"{path}: invalid YAML: {e}") from e
    except ValueError as e:  # an integer of more than 4300 digits, say
        raise RepoConfigError(f"{path}: invalid YAML value: {e}") from e
    finally:
        loader.dispose()


def _plain(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """Drop the line bookkeeping: templates and worker processes get plain data.

    A YAML alias is one object however often it is referred to, and stays one here
    (``memo``; ``copy.deepcopy`` and pickle keep the sharing too): a few hundred bytes
    of nested aliases (a "billion laughs") would otherwise expand to gigabytes. The
    loader already refuses a recursive alias.
    """
    if not isinstance(value, (dict, list)):
        return value
    memo = {} if memo is None else memo
    done = memo.get(id(value))
    if done is not None:
        return done
    out: Any
    if isinstance(value, dict):
        out = memo[id(value)] = {}
        for k, v in value.items():
            out[k] = _plain(v, memo)
    else:
        out = memo[id(value)] = []
        out.extend(_plain(v, memo) for v in value)
    return out


# -- a cursor that knows where a value came from --------------------------------------


@dataclass(frozen=True)
class _At:
    file: str
    line: int
    where: str = ""

    def err(self, message: str) -> RepoConfigError:
        prefix = f"{self.file}:{self.line}: "
        return RepoConfigError(f"{prefix}{self.where}: {message}" if self.where
                               else prefix + message)

    def key(self, parent: _Map, key: str) -> _At:
        line = abs(parent.key_lines.get(key, 0)) or self.line
        return _At(self.file, line, f"{self.where}.{key}" if self.where else key)

    def item(self, parent: _Seq, index: int) -> _At:
        line = parent.item_lines[index] if index < len(parent.item_lines) else self.line
        return _At(self.file, line, f"{self.where}[{index}]")

    @property
    def origin(self) -> str:
        return f"{self.file}:{self.line}"


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _mapping(value: Any, at: _At, keys: Mapping[str, bool], *, null_ok: bool = False,
             ) -> _Map:
    """A mapping with only the allowed ``keys`` (True = required)."""
    if value is None and null_ok:
        value = _Map()
        value.line, value.key_lines = at.line, {}
    if not isinstance(value, _Map):
        raise at.err(f"must be a mapping, not {_kind(value)}")
    for k in value:
        if not isinstance(k, str):
            raise at.err(f"key {k!r} must be a string")
        if k not in keys:
            line = abs(value.key_lines.get(k, 0)) or at.line
            raise _At(at.file, line, at.where).err(f"unknown key {k!r}{_suggest(k, keys)}")
    for k, required in keys.items():
        if required and k not in value:
            raise _At(at.file, value.line or at.line, at.where).err(f"missing key {k!r}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    # bool before int: YAML `yes` is a bool, which Python also counts as an int.
    for typ, word in ((bool, "a boolean"), (int, "a number"), (float, "a number"),
                      (str, "a string"), (list, "a list"), (dict, "a mapping")):
        if isinstance(value, typ):
            return word
    return f"a {type(value).__name__}"


def _string(value: Any, at: _At, *, pattern: re.Pattern[str] | None = None,
            what: str = "") -> str:
    if not isinstance(value, str):
        raise at.err(f"must be a string, not {_kind(value)}")
    if not value.strip():
        raise at.err("must not be empty")
    if pattern is not None and not pattern.fullmatch(value):
        raise at.err(f"{value!r} is not {what}")
    return value


def _integer(value: Any, at: _At, low: int, high: int) -> int:
    # YAML `true` is a bool, which Python counts as an int: not a timeout.
    if not isinstance(value, int) or isinstance(value, bool):
        raise at.err(f"must be an integer, not {_kind(value)}")
    if not low <= value <= high:
        raise at.err(f"{value} is outside {low}..{high}")
    return value


def _names(value: Any, at: _At, known: Mapping[str, Any], what: str) -> tuple[str, ...]:
    if not isinstance(value, _Seq):
        raise at.err(f"must be a list of {what} names, not {_kind(value)}")
    if not value:
        raise at.err(f"must name at least one {what} (leave the key out to mean all)")
    out: list[str] = []
    for i, name in enumerate(value):
        item = at.item(value, i)
        _string(name, item)
        if name not in known:
            raise item.err(f"unknown {what} {name!r}{_suggest(name, known)}")
        if name in out:
            raise item.err(f"{what} {name!r} is listed twice")
        out.append(name)
    return tuple(out)


def _vars(value: Any, at: _At) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, _Map):
        raise at.err(f"must be a mapping of variables, not {_kind(value)}")
    for k in value:
        key_at = at.key(value, k) if isinstance(k, str) else at
        if not isinstance(k, str) or not _VAR.fullmatch(k):
            raise key_at.err(f"variable name {k!r} is not an identifier "
                             "(letters, digits, _; not starting with a digit)")
        if k in RESERVED_VARS:
            raise key_at.err(f"variable name {k!r} is reserved: templates get it "
                             "from the renderer")
    return cast(dict[str, Any], _plain(value))


def _command(value: Any, at: _At) -> Command:
    if isinstance(value, str):
        run = _string(value, at)
        timeout, retries, delay = 60, 0, 0
    elif isinstance(value, _Map):
        m = _mapping(value, at, _COMMAND_KEYS)
        run = _string(m["run"], at.key(m, "run"))
        timeout = _integer(m.get("timeout", 60), at.key(m, "timeout"), 1, MAX_COMMAND_TIMEOUT)
        retries = _integer(m.get("retries", 0), at.key(m, "retries"), 0, 100)
        delay = _integer(m.get("delay", 0), at.key(m, "delay"), 0, 3600)
    else:
        raise at.err(f"must be a command string or a mapping with 'run', not {_kind(value)}")
    if "\x00" in run:
        raise at.err("command contains a NUL byte")
    return Command(run=run, timeout=timeout, retries=retries, delay=delay)


def _commands(value: Any, at: _At, lines: dict[str, int], label: str,
              ) -> tuple[Command, ...]:
    if isinstance(value, _Seq):
        out = []
        for i, item in enumerate(value):
            item_at = at.item(value, i)
            out.append(_command(item, item_at))
            lines[f"{label}[{i}]"] = item_at.line
        return tuple(out)
    lines[f"{label}[0]"] = at.line
    return (_command(value, at),)


# -- the model ------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupSpec:
    """A named set of hosts' shared variables (membership is listed on each host)."""

    name: str
    vars: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    origin: str = CONFIG_NAME

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise RepoConfigError(f"{self.origin}: group name {self.name!r} is not valid")


@dataclass(frozen=True)
class HostSpec:
    """One host: the groups it is in (order = precedence) and its inline variables."""

    name: str
    groups: tuple[str, ...] = ()
    vars: Mapping[str, Any] = field(default_factory=dict)
    origin: str = CONFIG_NAME

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name) or self.name.startswith("group_"):
            raise RepoConfigError(f"{self.origin}: host name {self.name!r} is not valid")
        if len(set(self.groups)) != len(self.groups):
            raise RepoConfigError(f"{self.origin}: host {self.name!r} lists a group twice")


@dataclass(frozen=True)
class FileSpec:
    """One ``files:`` entry: a source in the commit and where it goes on which hosts.

    ``dest`` and every command's ``run`` are Jinja templates rendered per host;
    ``lines`` maps a field label ("dest", "on_change[1]") to its line in gitops.yaml.
    """

    index: int
    src: str
    dest: str
    hosts: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    mode: int | None = None  # None: 0755 for an executable blob or 0644
    owner: str = "root"
    group: str = "root"
    validate: tuple[Command, ...] = ()
    check: tuple[Command, ...] = ()
    on_change: tuple[Command, ...] = ()
    health: tuple[Command, ...] = ()
    drift: DriftPolicy = "revert"
    origin: str = CONFIG_NAME
    lines: Mapping[str, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        where = f"{self.origin}: {self.label}"
        if not _is_relative_path(self.src):
            raise RepoConfigError(f"{where}.src: {self.src!r} is not a normalised relative "
                                  "path inside the repository")
        if not self.dest.strip():
            raise RepoConfigError(f"{where}.dest: must not be empty")
        if self.mode is not None and not 0 <= self.mode <= 0o7777:
            raise RepoConfigError(f"{where}.mode: {self.mode:o} is not a file mode")
        for account in (self.owner, self.group):
            if not _ACCOUNT.fullmatch(account):
                raise RepoConfigError(f"{where}: {account!r} is not a user or group name")
        if self.drift not in DRIFT_POLICIES:
            raise RepoConfigError(f"{where}.drift: must be one of {', '.join(DRIFT_POLICIES)}")

    @property
    def label(self) -> str:
        return f"files[{self.index}]"

    @property
    def is_template(self) -> bool:
        return self.src.endswith(TEMPLATE_SUFFIX)

    def where(self, key: str = "") -> str:
        """'gitops.yaml:42: files[3].dest' for error messages about one field."""
        file = self.origin.rpartition(":")[0] or self.origin
        line = self.lines.get(key) if key else None
        loc = f"{file}:{line}" if line else self.origin
        return f"{loc}: {self.label}.{key}" if key else f"{loc}: {self.label}"

    def selects(self, host: HostSpec) -> bool:
        """No ``hosts``/``groups`` means every host; both given means either matches."""
        if not self.hosts and not self.groups:
            return True
        return host.name in self.hosts or any(g in host.groups for g in self.groups)


def _is_relative_path(path: str) -> bool:
    return (bool(path) and path != "." and not path.startswith("/")
            and posixpath.normpath(path) == path
            and not path.startswith("../") and path != ".." and "\\" not in path)


@dataclass(frozen=True)
class RepoConfig:
    """The whole ``gitops.yaml``: every host, group and file mapping, cross-checked."""

    path: str
    hosts: Mapping[str, HostSpec]
    files: tuple[FileSpec, ...]
    vars: Mapping[str, Any] = field(default_factory=dict)
    groups: Mapping[str, GroupSpec] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise RepoConfigError(f"{self.path}: unsupported version {self.version!r}")
        if not self.hosts:
            raise RepoConfigError(f"{self.path}: hosts: must name at least one host")
        for host in self.hosts.values():
            for g in host.groups:
                if g not in self.groups:
                    raise RepoConfigError(f"{host.origin}: host {host.name!r}: unknown group "
                                          f"{g!r}{_suggest(g, self.groups)}")
        for f in self.files:
            for h in f.hosts:
                if h not in self.hosts:
                    raise RepoConfigError(f"{f.where('hosts')}: unknown host {h!r}")
            for g in f.groups:
                if g not in self.groups:
                    raise RepoConfigError(f"{f.where('groups')}: unknown group {g!r}")

    @classmethod
    def parse(cls, data: bytes | str, path: str = CONFIG_NAME) -> RepoConfig:
        """Parse gitops.yaml text; ``path`` is how errors name the file."""
        raw = load_yaml(data, path)
        if raw is None:
            raise RepoConfigError(f"{path}:1: the file is empty")
        top = _mapping(raw, _At(path, 1), _TOP_KEYS)
        root = _At(path, top.line)
        version = _integer(top["version"], root.key(top, "version"), 0, 1 << 31)
        if version != CONFIG_VERSION:
            raise root.key(top, "version").err(f"unsupported version {version} "
                                               f"(this builder reads version {CONFIG_VERSION})")
        global_vars = _vars(top.get("vars"), root.key(top, "vars"))

        groups: dict[str, GroupSpec] = {}
        groups_at = root.key(top, "groups")
        groups_in = _name_map(top.get("groups"), groups_at, "group")
        for name, body in groups_in.items():
            at = groups_at.key(groups_in, name)
            m = _mapping(body, at, _GROUP_KEYS, null_ok=True)
            desc = m.get("description", "")
            if not isinstance(desc, str):
                raise at.key(m, "description").err("must be a string")
            groups[name] = GroupSpec(name=name, vars=_vars(m.get("vars"), at.key(m, "vars")),
                                     description=desc, origin=at.origin)

        hosts: dict[str, HostSpec] = {}
        hosts_at = root.key(top, "hosts")
        hosts_in = _name_map(top["hosts"], hosts_at, "host")
        if not hosts_in:
            raise hosts_at.err("must name at least one host")
        for name, body in hosts_in.items():
            at = hosts_at.key(hosts_in, name)
            if name.startswith("group_"):
                raise at.err(f"host name {name!r} would clash with the group vars file "
                             f"{group_vars_path(name[6:])}")
            m = _mapping(body, at, _HOST_KEYS, null_ok=True)
            member_of = (_names(m["groups"], at.key(m, "groups"), groups, "group")
                         if "groups" in m else ())
            hosts[name] = HostSpec(name=name, groups=member_of,
                                   vars=_vars(m.get("vars"), at.key(m, "vars")),
                                   origin=at.origin)

        files_at = root.key(top, "files")
        files_in = top["files"]
        if files_in is None:
            files_in = _Seq()
        if not isinstance(files_in, _Seq):
            raise files_at.err(f"must be a list, not {_kind(files_in)}")
        files = tuple(_file_spec(item, files_at.item(files_in, i), i, hosts, groups)
                      for i, item in enumerate(files_in))
        config = cls(path=path, hosts=hosts, files=files, vars=global_vars, groups=groups,
                     version=version)
        logger.debug("%s: %d hosts, %d groups, %d file entries", path, len(hosts),
                     len(groups), len(files))
        return config

    def vars_for(self, host: str, var_files: Mapping[str, Mapping[str, Any]] | None = None,
                 ) -> dict[str, Any]:
        """The merged variables of ``host`` (see the module docstring for the order).

        ``var_files`` maps a vars file path (``vars/frodo.yaml``) to its parsed content;
        absent files are simply skipped. The result is a fresh deep copy.
        """
        files = var_files or {}
        spec = self.hosts[host]
        merged: dict[str, Any] = {}
        layers: list[Mapping[str, Any]] = [self.vars]
        for g in spec.groups:
            layers.append(files.get(group_vars_path(g), {}))
            layers.append(self.groups[g].vars)
        layers.append(files.get(host_vars_path(host), {}))
        layers.append(spec.vars)
        for layer in layers:
            merged = _merge(merged, layer)
        return copy.deepcopy(merged)


def _name_map(value: Any, at: _At, what: str) -> _Map:
    """A mapping of host or group names to (possibly empty) bodies."""
    if value is None:
        empty = _Map()
        empty.line, empty.key_lines = at.line, {}
        return empty
    if not isinstance(value, _Map):
        raise at.err(f"must be a mapping of {what} names, not {_kind(value)}")
    for name in value:
        key_at = at.key(value, name) if isinstance(name, str) else at
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise key_at.err(f"{name!r} is not a valid {what} name "
                             "(letters, digits, '.', '_', '-'; at most 63)")
    return value


def _file_spec(value: Any, at: _At, index: int, hosts: Mapping[str, HostSpec],
               groups: Mapping[str, GroupSpec]) -> FileSpec:
    m = _mapping(value, at, _FILE_KEYS)
    lines: dict[str, int] = {k: abs(m.key_lines[k]) for k in m if isinstance(k, str)}
    src_at = at.key(m, "src")
    src = _string(m["src"], src_at)
    if not _is_relative_path(src):
        raise src_at.err(f"{src!r} is not a normalised relative path inside the repository")
    dest_at = at.key(m, "dest")
    dest = _string(m["dest"], dest_at)
    if "{{" not in dest and "{%" not in dest:
        # A literal dest is checked now; a templated one after rendering, per host.
        try:
            check_target_path(dest)
        except ManifestError as e:  # its own reason: not NFC, a component too long, ...
            raise dest_at.err(str(e).removeprefix("manifest path: ")) from e
    sel_hosts = _names(m["hosts"], at.key(m, "hosts"), hosts, "host") if "hosts" in m else ()
    sel_groups = (_names(m["groups"], at.key(m, "groups"), groups, "group")
                  if "groups" in m else ())
    mode: int | None = None
    if "mode" in m:
        mode_at = at.key(m, "mode")
        raw_mode = m["mode"]
        if isinstance(raw_mode, int) and not isinstance(raw_mode, bool):
            raise mode_at.err(f"must be a quoted string like \"0644\" (YAML read {raw_mode} "
                              "as a number)")
        if not isinstance(raw_mode, str) or not _MODE.fullmatch(raw_mode):
            raise mode_at.err(f"{raw_mode!r} is not an octal mode like \"0644\"")
        mode = int(raw_mode, 8)
    owner = (_string(m["owner"], at.key(m, "owner"), pattern=_ACCOUNT, what="a user name")
             if "owner" in m else "root")
    group = (_string(m["group"], at.key(m, "group"), pattern=_ACCOUNT, what="a group name")
             if "group" in m else "root")
    commands: dict[str, tuple[Command, ...]] = {}
    for name in _COMMAND_FIELDS:
        if name in m:
            commands[name] = _commands(m[name], at.key(m, name), lines, name)
    drift = "revert"
    if "drift" in m:
        drift_at = at.key(m, "drift")
        drift = _string(m["drift"], drift_at)
        if drift not in DRIFT_POLICIES:
            raise drift_at.err(f"{drift!r} is not one of {', '.join(DRIFT_POLICIES)}"
                               f"{_suggest(drift, DRIFT_POLICIES)}")
    return FileSpec(
        index=index, src=src, dest=dest, hosts=sel_hosts, groups=sel_groups, mode=mode,
        owner=owner, group=group, drift=cast(DriftPolicy, drift), origin=at.origin,
        lines=lines, **commands,
    )


def parse_vars_file(data: bytes | str, path: str) -> dict[str, Any]:
    """A ``vars/*.yaml`` file: a mapping of variables (an empty file means none)."""
    raw = load_yaml(data, path)
    if raw is None:
        return {}
    return _vars(raw, _At(path, getattr(raw, "line", 1)))


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out
