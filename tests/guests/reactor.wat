;; A WASI reactor: it exports functions but no _start, so it is not a command kwasm can run.
(module
  (memory (export "memory") 1)
  (func (export "_initialize"))
  (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))
