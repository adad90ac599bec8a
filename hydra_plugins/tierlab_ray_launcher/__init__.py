"""tierlab's hydra launcher plugin: each run of a --multirun sweep as one Ray task (conf/hydra/launcher/tierlab_ray).

`hydra_plugins` is a namespace package shared with the other launcher plugins (joblib, submitit): no
`__init__.py` there. Ray is imported only when a sweep is launched, so hydra's plugin scan stays cheap and works
without Ray installed.
"""
