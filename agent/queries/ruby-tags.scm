; Ruby definitions: classes, modules, constant assignments, and `def`s: functions at the top level,
; methods inside a class, module, `class << self` or block body; `def self.x` singleton methods.
(class name: (_) @name) @definition.class
(module name: (_) @name) @definition.module
(assignment left: (constant) @name) @definition.constant

; top-level def: a function
(program (method name: (_) @name) @definition.function)
; def in a class/module/singleton-class/block body, or wrapped like `private def x`: a method
(body_statement (method name: (_) @name) @definition.method)
(argument_list (method name: (_) @name) @definition.method)
; def under a conditional or begin: a function, reported as a method when inside a class
(then (method name: (_) @name) @definition.function)
(else (method name: (_) @name) @definition.function)
(begin (method name: (_) @name) @definition.function)
(ensure (method name: (_) @name) @definition.function)
(block_body (method name: (_) @name) @definition.function)
(do (method name: (_) @name) @definition.function)
(parenthesized_statements (method name: (_) @name) @definition.function)
(begin_block (method name: (_) @name) @definition.function)
(end_block (method name: (_) @name) @definition.function)

(singleton_method name: (_) @name) @definition.method
