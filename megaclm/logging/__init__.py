"""L0 logging: one `megaclm` logger tree and warn-once helpers."""
import logging
import sys

_warned: set[str] = set()


def get_logger(name: str = "megaclm") -> logging.Logger:
    logger = logging.getLogger(name)
    root = logging.getLogger("megaclm")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logger


def warn_once(key: str, msg: str, logger: logging.Logger | None = None) -> None:
    """Log `msg` as a warning the first time `key` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    (logger or get_logger()).warning(msg)
