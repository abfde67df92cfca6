; TypeScript definitions: the JavaScript set (functions, generators, function-valued bindings, classes, methods,
; UPPER_CASE constants) plus abstract classes, interfaces and their method signatures, type aliases, enums, namespaces/modules.

(function_declaration name: (identifier) @name) @definition.function
(generator_function_declaration name: (identifier) @name) @definition.function
(function_signature name: (identifier) @name) @definition.function

(class_declaration name: (type_identifier) @name) @definition.class
(abstract_class_declaration name: (type_identifier) @name) @definition.class
(variable_declarator name: (identifier) @name value: (class)) @definition.class

(class_body
  (method_definition
    name: [(property_identifier) (private_property_identifier) (string)] @name) @definition.method)
(class_body
  (abstract_method_signature
    name: [(property_identifier) (private_property_identifier) (string)] @name) @definition.method)
(class_body
  (method_signature
    name: [(property_identifier) (private_property_identifier) (string)] @name) @definition.method)
(class_body
  (public_field_definition
    name: [(property_identifier) (private_property_identifier)] @name
    value: [(arrow_function) (function_expression) (generator_function)]) @definition.method)

(interface_declaration name: (type_identifier) @name) @definition.interface
(interface_body
  (method_signature
    name: [(property_identifier) (private_property_identifier) (string)] @name) @definition.method)

(type_alias_declaration name: (type_identifier) @name) @definition.type
(enum_declaration name: (identifier) @name) @definition.enum
(internal_module name: [(identifier) (nested_identifier)] @name) @definition.module
(module name: [(identifier) (nested_identifier)] @name) @definition.module
(module name: (string (string_fragment) @name)) @definition.module

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
              (ternary_expression) (parenthesized_expression)
              (as_expression) (satisfies_expression) (non_null_expression)]
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
                (ternary_expression) (parenthesized_expression)
                (as_expression) (satisfies_expression) (non_null_expression)]
        (#match? @name "^[A-Z][A-Z0-9_]*$")) @definition.constant)))
