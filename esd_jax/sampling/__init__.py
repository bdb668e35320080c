"""Sampling: the compiled sampler (sampler.py), prompt CSVs (prompts.py), the folder runner behind
`esd-jax sample` (folder.py) and the records that keep its reruns honest (record.py).

(The package is `sampling`, not `sample`: a submodule named like the package's `esd_jax.sample`
function would replace that function on the package once imported.)
"""
