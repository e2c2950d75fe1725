"""Build the user's model from ``model.factory`` (``pkg.module:callable`` or ``path/file.py:callable``).

Importing the factory runs the user's own code, by their explicit choice in the config;
checkpoints, by contrast, are never executed (see :mod:`equiaudit.io.checkpoints`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import torch

from equiaudit.errors import ConfigError, first_line
from equiaudit.io.config import resolve_path

__all__ = ["build_model", "load_factory", "build_configured"]


def load_factory(spec: str, base: Path | None = None):
    """The callable named by ``spec``; a ``.py`` path is imported under a private module name."""
    target, _, attribute = spec.rpartition(":")
    if target.endswith(".py"):
        path = resolve_path(target, base)
        if not path.is_file():
            raise ConfigError(f"config: model.factory file not found: {path}")
        name = "equiaudit_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        module = sys.modules.get(name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            # The file's own folder is importable while it runs, as pytest does for a test
            # file (rootdir-less "prepend" import mode): `from mymodels import Net` in
            # models2.py finds its neighbour mymodels.py.
            folder = str(path.resolve().parent)
            try:
                with _on_sys_path(folder):
                    module_spec.loader.exec_module(module)
            except BaseException as exc:
                del sys.modules[name]
                if isinstance(exc, ModuleNotFoundError):
                    raise ConfigError(f"config: model.factory: importing {path} raised ModuleNotFoundError: {first_line(exc)} "
                                      f"(searched {path.parent or '.'} and sys.path; install the package or put the module beside the file)") from exc
                raise _factory_error(f"importing {path}", exc) from exc
    else:
        # A dotted module is looked up on sys.path, plus the working directory (as `python -m`
        # and pytest do) and the config's folder, so `mymodels:build` beside the config works.
        searched = [str(Path.cwd())] + ([str(base.resolve())] if base is not None else [])
        try:
            with _on_sys_path(*searched):
                module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            where = ", ".join(dict.fromkeys(searched))
            raise ConfigError(f"config: model.factory module {target!r} cannot be imported ({exc}); searched {where} and "
                              f"sys.path (install it, or give a file: 'path/to/{target.replace('.', '/')}.py:{attribute}')") from exc
        except BaseException as exc:
            raise _factory_error(f"importing {target}", exc) from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"config: model.factory: {target!r} has no callable {attribute!r}")
    return factory


@contextlib.contextmanager
def _on_sys_path(*folders: str):
    """``folders`` at the front of ``sys.path`` for the import (those not there already);
    removed afterwards, so one config's folder does not shadow another's modules. Modules
    imported from them stay in ``sys.modules`` (the model's classes must stay importable)."""
    added = [folder for folder in dict.fromkeys(folders) if folder not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for folder in added:
            try:
                sys.path.remove(folder)
            except ValueError:
                pass


def _factory_error(doing: str, exc: BaseException) -> ConfigError:
    """A failure of the user's factory code as a config error (exit 2); Ctrl-C passes through."""
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    if isinstance(exc, SystemExit):
        return ConfigError(f"config: model.factory: {doing} called sys.exit({exc.code!r}); a factory must return a model")
    return ConfigError(f"config: model.factory: {doing} raised {type(exc).__name__}: {first_line(exc)}")


def build_model(spec: str, kwargs: dict[str, Any] | None = None, base: Path | None = None) -> torch.nn.Module:
    """Call the factory with ``kwargs``; it must return an ``nn.Module``.

    Every failure of the user's code (import errors, exceptions, ``sys.exit``) is a
    :class:`~equiaudit.errors.ConfigError` naming the factory: the config cannot be audited.
    """
    factory = load_factory(spec, base)
    kwargs = dict(kwargs or {})
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"config: model.factory {spec!r} rejected model.kwargs: {exc}") from exc
    except ValueError:
        pass  # no signature to check (a builtin): let the call tell
    try:
        model = factory(**kwargs)
    except BaseException as exc:
        raise _factory_error(f"calling {spec}", exc) from exc
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"config: model.factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_configured(model, base: Path | None = None) -> torch.nn.Module:
    """The model a config's ``model`` section names: a family's network (``model.family``,
    built from ``model.source``, the checkpoint the CLI chose, with ``model.kwargs`` as the
    family's options) or a factory's (:func:`build_model`). A family's failure is a
    :class:`~equiaudit.errors.ConfigError` naming it (a missing package: the extra to install)."""
    if model.family is None:
        return build_model(model.factory, model.kwargs, base)
    from equiaudit.zoo.families.base import build

    try:
        built = build(model.family, model.source, allow_torchscript=model.allow_torchscript, **model.kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except ImportError as exc:
        raise ConfigError(f"model.family {model.family}: {first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - the family's package: its failure is the config's
        raise ConfigError(f"model.family {model.family}: cannot build the model ({type(exc).__name__}: {first_line(exc)})") from exc
    if not isinstance(built, torch.nn.Module):
        raise ConfigError(f"model.family {model.family} built {type(built).__name__}, not a torch.nn.Module")
    return built
