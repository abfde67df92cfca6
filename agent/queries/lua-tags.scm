; Lua definitions: every function, as `function`: global and local declarations (named in full, `M.util.foo`,
; `obj:bar`), and function expressions assigned to a local, global or field (`local f = function`, `M.f = function`).
(function_declaration
  name: [(identifier) (dot_index_expression) (method_index_expression)] @name) @definition.function

; local f = function ... end  (the whole statement)
(variable_declaration
  (assignment_statement
    (variable_list . name: (identifier) @name .)
    (expression_list . value: (function_definition) .))) @definition.function

; f = function ... end, M.f = function ... end  (the whole statement; not the one inside `local`)
(chunk
  (assignment_statement
    (variable_list . name: [(identifier) (dot_index_expression)] @name .)
    (expression_list . value: (function_definition) .)) @definition.function)
(block
  (assignment_statement
    (variable_list . name: [(identifier) (dot_index_expression)] @name .)
    (expression_list . value: (function_definition) .)) @definition.function)

; local a, f = x, function ... end  (the function expression, paired by position: 1st to 3rd)
(assignment_statement
  (variable_list . name: [(identifier) (dot_index_expression)] @name . (_))
  (expression_list . value: (function_definition) @definition.function))
(assignment_statement
  (variable_list . (_) . name: [(identifier) (dot_index_expression)] @name)
  (expression_list . (_) . value: (function_definition) @definition.function))
(assignment_statement
  (variable_list . (_) . (_) . name: [(identifier) (dot_index_expression)] @name)
  (expression_list . (_) . (_) . value: (function_definition) @definition.function))
