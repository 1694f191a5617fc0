;; Imports a function no WASI host provides, so linking must fail with a clear error.
(module
  (import "env" "missing_host_function" (func))
  (memory (export "memory") 1)
  (func (export "_start") call 0))
