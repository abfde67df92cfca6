; C definitions: function definitions, struct/union (struct) and enum specifiers with a body, typedef names (type),
; and #define macros (an include guard's bare #define is left out).

(function_definition
  declarator: (function_declarator declarator: (identifier) @name)) @definition.function
(function_definition
  declarator: (pointer_declarator declarator: (function_declarator declarator: (identifier) @name))) @definition.function
(function_definition
  declarator: (pointer_declarator declarator: (pointer_declarator declarator: (function_declarator declarator: (identifier) @name)))) @definition.function

(struct_specifier name: (type_identifier) @name body: (field_declaration_list)) @definition.struct
(union_specifier name: (type_identifier) @name body: (field_declaration_list)) @definition.struct
(enum_specifier name: (type_identifier) @name body: (enumerator_list)) @definition.enum

(type_definition declarator: (type_identifier) @name) @definition.type
(type_definition declarator: (pointer_declarator declarator: (type_identifier) @name)) @definition.type
(type_definition declarator: (pointer_declarator declarator: (pointer_declarator declarator: (type_identifier) @name))) @definition.type
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
