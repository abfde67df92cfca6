; C++ definitions: the C set (function definitions, struct/union/enum specifiers with a body, typedef and `using` aliases,
; #define macros) plus classes, namespaces (module), methods defined in class bodies, out-of-class `A::f` definitions (method)
; and local lambdas bound to a name (function).

; free functions and in-class definitions (the latter become methods through their enclosing class)
(function_definition
  declarator: (function_declarator
    declarator: [(identifier) (field_identifier) (destructor_name) (operator_name)] @name)) @definition.function
(function_definition
  declarator: (pointer_declarator
    declarator: (function_declarator
      declarator: [(identifier) (field_identifier) (operator_name)] @name))) @definition.function
(function_definition
  declarator: (reference_declarator
    (function_declarator
      declarator: [(identifier) (field_identifier) (operator_name)] @name))) @definition.function

; out-of-class definitions: A::f, ns::A::f
(function_definition
  declarator: (function_declarator
    declarator: (qualified_identifier
      name: [(identifier) (destructor_name) (operator_name)] @name))) @definition.method
(function_definition
  declarator: (function_declarator
    declarator: (qualified_identifier
      name: (qualified_identifier name: [(identifier) (destructor_name) (operator_name)] @name)))) @definition.method
(function_definition
  declarator: (pointer_declarator
    declarator: (function_declarator
      declarator: (qualified_identifier name: [(identifier) (operator_name)] @name)))) @definition.method
(function_definition
  declarator: (reference_declarator
    (function_declarator
      declarator: (qualified_identifier name: [(identifier) (operator_name)] @name)))) @definition.method

(declaration
  declarator: (init_declarator
    declarator: (identifier) @name
    value: (lambda_expression))) @definition.function

(class_specifier name: (type_identifier) @name body: (field_declaration_list)) @definition.class
(struct_specifier name: (type_identifier) @name body: (field_declaration_list)) @definition.struct
(union_specifier name: (type_identifier) @name body: (field_declaration_list)) @definition.struct
(enum_specifier name: (type_identifier) @name body: (enumerator_list)) @definition.enum

(namespace_definition name: [(namespace_identifier) (nested_namespace_specifier)] @name) @definition.module

(alias_declaration name: (type_identifier) @name) @definition.type
(type_definition declarator: (type_identifier) @name) @definition.type
(type_definition declarator: (pointer_declarator declarator: (type_identifier) @name)) @definition.type
(type_definition declarator: (array_declarator declarator: (type_identifier) @name)) @definition.type
(type_definition declarator: (function_declarator declarator: (type_identifier) @name)) @definition.type
(type_definition
  declarator: (function_declarator
    declarator: (parenthesized_declarator (pointer_declarator declarator: (type_identifier) @name)))) @definition.type

(preproc_function_def name: (identifier) @name) @definition.macro
(preproc_def name: (identifier) @name value: (_)) @definition.macro
; a bare `#define NAME`: everywhere except as the include guard of its own #ifndef
(translation_unit (preproc_def !value name: (identifier) @name) @definition.macro)
(preproc_if (preproc_def !value name: (identifier) @name) @definition.macro)
(preproc_elif (preproc_def !value name: (identifier) @name) @definition.macro)
(preproc_else (preproc_def !value name: (identifier) @name) @definition.macro)
(preproc_ifdef
  name: (identifier) @guard
  (preproc_def !value name: (identifier) @name) @definition.macro
  (#not-eq? @name @guard))
