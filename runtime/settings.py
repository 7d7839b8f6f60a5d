"""The options that load a guard, as one typed object.

Every command that loads a guard (`siren score`, `serve`, `serve-ray`, `bench`,
`score-corpus`) and the Ray/Serve builders take these from one `GuardSettings`, so a
flag, its default, its help text and its check are written once. Each field carries its
command-line spelling and help as metadata (`setting()`); `siren_cli.options` builds the
argument groups and the `SIREN_...` environment variables from them, the way
llama-cpp-python's server settings drive its CLI.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

#: the kinds a setting can be parsed as (`siren_cli.options` maps each to an argparse action)
KINDS = ("str", "int", "float", "flag", "no_flag", "switch", "positional", "more", "append")


def setting(default: Any, help: str, *, kind: str, flag: Optional[str] = None, choices=None,
            env: Optional[str] = None, metavar: Optional[str] = None):
    """A dataclass field with its command-line form: `kind` says how it is parsed ("flag":
    --x sets True; "no_flag": --no-x sets False; "switch": --x/--no-x, None meaning the
    default; "positional": an argument; "more": the positionals after it; "append": a
    repeatable option, its variable comma-separated), `flag` its spelling (default --field-name),
    `env` its environment variable's name (default: `env_of`)."""
    assert kind in KINDS, kind
    return dataclasses.field(default=default, metadata={"help": help, "kind": kind, "flag": flag,
                                                        "choices": choices, "env": env, "metavar": metavar})


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def env_of(field: dataclasses.Field) -> str:
    """SIREN_ + the flag's name (--session-ttl: SIREN_SESSION_TTL); a --no-x flag's variable
    names what it turns off (--no-verify: SIREN_VERIFY=0)."""
    if field.metadata.get("env"):
        return field.metadata["env"]
    name = field.name if field.metadata["kind"] in ("no_flag", "positional", "more") else flag_of(field)[2:]
    return "SIREN_" + name.upper().replace("-", "_")


def check_positive_int(value, option: str, *, optional: bool = False) -> None:
    """One check for every count option: a real integer, at least 1 (None when optional)."""
    from .validation import check_int
    check_int(value, option, optional=optional)


def check_choice(value, choices, option: str) -> None:
    if value is not None and value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class GuardSettings:
    """Where a guard comes from and how it is loaded (`SirenGuard.from_pretrained`'s options)."""
    bundle: str = setting("", "bundle folder or Hub repo id (owner/name)", kind="positional")
    revision: Optional[str] = setting(None, "Hub bundle: branch, tag or commit (default: main)", kind="str")
    cache_dir: Optional[str] = setting(None, "Hub bundle: Hugging Face cache directory (default: HF_HOME's)",
                                       kind="str")
    local_files_only: bool = setting(False, "Hub bundle: use the local cache only, never the network",
                                     kind="flag", flag="--offline")
    verify: bool = setting(True, "skip hashing the bundle's files (trusted, read-only bundles only)",
                           kind="no_flag", flag="--no-verify")
    backend: Optional[str] = setting(None, "runtime backend (default: the best available; a fallback is said once)",
                                     kind="str", choices=("tensorrt", "onnxruntime"))
    device: Optional[str] = setting(None, "where the guard runs (default: a GPU when usable, else the CPU)",
                                    kind="str", choices=("cpu", "cuda"))
    prepack_weights: Optional[bool] = setting(
        None, "ONNX Runtime on a CPU: re-lay the weights for the GEMM (feeds of a few tokens ~1.7x faster). "
              "Default: on for bundles with a step graph (one session, one copy of the weights); "
              "--no-prepack-weights reads the mapped weights in place (least memory)", kind="switch")
    max_batch_size: Optional[int] = setting(
        None, "most rows in one engine call (default: the runner's limit, 32 unless it says less)", kind="int",
        metavar="ROWS")
    token_budget: Optional[int] = setting(
        None, "most padded tokens in one engine call (default: 512 on a CPU, 16384 on a GPU)", kind="int",
        metavar="TOKENS")

    def check_guard(self) -> None:
        """Every loading option is usable: refused here, before any bundle is read."""
        if not isinstance(self.bundle, str) or not self.bundle:
            raise ValueError("name a bundle: a folder made by `siren export` or a Hub repo id (owner/name)")
        check_choice(self.backend, ("tensorrt", "onnxruntime"), "--backend")
        check_choice(self.device, ("cpu", "cuda"), "--device")
        check_positive_int(self.max_batch_size, "--max-batch-size", optional=True)
        check_positive_int(self.token_budget, "--token-budget", optional=True)

    def guard_options(self) -> dict:
        """The keyword arguments of `from_pretrained` / `load_guard` (unset limits left out,
        so the runner's own defaults apply)."""
        options = dict(device=self.device, backend=self.backend, verify=self.verify, revision=self.revision,
                       cache_dir=self.cache_dir, local_files_only=self.local_files_only,
                       prepack_weights=self.prepack_weights)
        if self.max_batch_size is not None:
            options["max_batch_size"] = self.max_batch_size
        if self.token_budget is not None:
            options["token_budget"] = self.token_budget
        return options

    def load(self, **extra):
        """The guard the bundle declares (content or trajectory), loaded with these options."""
        from .loading import load_guard
        self.check_guard()
        return load_guard(self.bundle, **{**self.guard_options(), **extra})


def settings_fields(cls) -> list:
    """The fields of a settings class that carry a command-line form."""
    return [f for f in dataclasses.fields(cls) if "kind" in f.metadata]


__all__ = ["GuardSettings", "setting", "settings_fields", "flag_of", "env_of", "check_positive_int",
           "check_choice"]
