"""Accuracy studies: methods compared on the same test tasks over seeds (``compare``, with its
statistics in ``paired``), other libraries' implementations as peer rows (``peers/``), Lake's
one-shot challenge (the proxy folds ``lake_proxy`` builds, the meta-test ``lake_levers``, the
pixel baseline ``hausdorff``) and the inner loop's convergence (``inner_convergence``); the
numbers of docs/benchmarks.md and docs/meta-gradients.md. Speed and memory are ``benchmarks/``'s."""
