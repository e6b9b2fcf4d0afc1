"""Tools that look at or measure the compiler: `explain` (the per-parameter table),
`graph_view` (the rewritten step as code and a picture), `inspect_cmd` (`fxclip inspect`),
`memory` (peak memory of a callable), `memory_cmd` (`fxclip memory`) and the `bench` package
(`fxclip bench`, the GPU check).

The compiler (`fxclip.passes`, `fxclip.rules` and the core modules) never imports them, except
`PrivateStep.explain()` and `.graph()`, which load `explain` and `graph_view` when called
(tests/test_layers.py holds this).
"""
