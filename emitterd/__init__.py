"""emitterd: a local event-delivery daemon with supervised pools of emitter workers."""

__version__ = "0.1.0"
