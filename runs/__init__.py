"""The life of a response: admission, the run task, upstream adapters, event and snapshot assembly."""
