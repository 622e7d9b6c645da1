"""The reference's debug switch (`dictionary_learning.config.DEBUG`): when True, nnsight traces are
scanned and validated (`buffer.tracer_kwargs`), which is slower but gives clearer errors."""

DEBUG = False
