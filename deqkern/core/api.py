"""The spelling changes of the public API (CHANGELOG.md, 0.2.0), kept for one release: an old keyword, or an option
given by position where it is now keyword-only, raises a TypeError that names the new spelling instead of a
generic "unexpected keyword" or, worse, binding a value to another parameter."""
import functools
import inspect


def api_changes(what, renamed=None, old_positional=()):
    """Decorator for a public function or method.

    renamed: {old keyword: new keyword}; old_positional: the names the arguments after the positional ones used to
    bind to (in their old order), so that a call still passing them by position is told which keyword to use."""
    renamed = dict(renamed or {})

    def decorate(fn):
        parameters = list(inspect.signature(fn).parameters.values())
        n_positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
        has_var_positional = any(p.kind == p.VAR_POSITIONAL for p in parameters)
        n_shown = n_positional - (1 if parameters and parameters[0].name == "self" else 0)  # a method's self aside

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renamed.items():
                if old in kwargs:
                    raise TypeError(f"deqkern.{what}: {old}= is now spelled {new}= (renamed in deqkern 0.2.0)")
            if not has_var_positional and len(args) > n_positional:
                extra = len(args) - n_positional
                names = list(old_positional[:extra]) or ["..."]
                shown = ", ".join(f"{name}=..." for name in names)
                raise TypeError(f"deqkern.{what}: takes {n_shown} positional argument(s) and "
                                f"{extra} more were given: options are keyword-only since deqkern 0.2.0, write "
                                f"{shown}")
            return fn(*args, **kwargs)

        return wrapper

    return decorate

