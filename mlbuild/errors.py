"""The error tree: user mistakes (exit 2) apart from build outcomes and bugs."""

from __future__ import annotations


class MlbuildError(Exception):
    """Root of every error mlbuild raises on purpose."""

    exit_code = 1


class UserError(MlbuildError):
    """A mistake in pipeline.toml or on the command line: one line, exit 2."""

    exit_code = 2


class PipelineError(UserError):
    """Bad pipeline file, located as `file: targets.NAME.key: message`."""

    def __init__(self, file: str, message: str, key: str | None = None) -> None:
        self.file = file
        self.key = key
        self.message = message
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + message)


class UsageError(UserError):
    """Bad command-line use: unknown target, malformed --set, and the like."""


class StateError(MlbuildError):
    """The workspace state cannot be used (for example, not writable)."""


class Interrupted(MlbuildError):
    """The build was stopped by SIGINT or SIGTERM; exit 130."""

    exit_code = 130


class FingerprintError(UserError):
    """An input or output mlbuild cannot fingerprint: not a regular file, or unreadable."""


class ParamsFileError(PipelineError):
    """A params file (`params_files`) that cannot be read, parsed or edited: `file[:line]: ...`."""
