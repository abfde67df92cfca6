; JavaScript definitions: functions and generators (also const/let/var bound to a function or arrow function),
; classes and their methods, and top-level UPPER_CASE const bindings to non-function values (constants).

(function_declaration name: (identifier) @name) @definition.function
(generator_function_declaration name: (identifier) @name) @definition.function

(class_declaration name: (identifier) @name) @definition.class
(variable_declarator name: (identifier) @name value: (class)) @definition.class

(class_body
  (method_definition
    name: [(property_identifier) (private_property_identifier) (string)] @name) @definition.method)

(class_body
  (field_definition
    property: [(property_identifier) (private_property_identifier)] @name
    value: [(arrow_function) (function_expression) (generator_function)]) @definition.method)

(lexical_declaration
  (variable_declarator
    name: (identifier) @name
    value: [(arrow_function) (function_expression) (generator_function)]) @definition.function)
(variable_declaration
  (variable_declarator
    name: (identifier) @name
    value: [(arrow_function) (function_expression) (generator_function)]) @definition.function)

(program
  (lexical_declaration
    "const"
    (variable_declarator
      name: (identifier) @name
      value: [(number) (string) (template_string) (regex) (true) (false) (null) (undefined)
              (object) (array) (identifier) (member_expression) (subscript_expression)
              (call_expression) (new_expression) (binary_expression) (unary_expression)
              (ternary_expression) (parenthesized_expression)]
      (#match? @name "^[A-Z][A-Z0-9_]*$")) @definition.constant))
(program
  (export_statement
    declaration: (lexical_declaration
      "const"
      (variable_declarator
        name: (identifier) @name
        value: [(number) (string) (template_string) (regex) (true) (false) (null) (undefined)
                (object) (array) (identifier) (member_expression) (subscript_expression)
                (call_expression) (new_expression) (binary_expression) (unary_expression)
                (ternary_expression) (parenthesized_expression)]
        (#match? @name "^[A-Z][A-Z0-9_]*$")) @definition.constant)))
