"""The modes of stage tlm (``tlm_mode``), one module each with one entry function ``run(run) -> (rows, stats)``.

:data:`tlm_plugin.registry.MODES` lists them; :func:`tlm_plugin.train.workflow.run_tlm` builds the run and calls the
chosen mode's entry once. A new mode (serving, for one) is one module here and one registration there.
"""
