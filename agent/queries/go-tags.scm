; Go definitions: functions, methods (with interface method specs), struct/interface/other type specs and aliases,
; constants, and local or package variables bound to a function literal (function).

(function_declaration name: (identifier) @name) @definition.function
(method_declaration name: (field_identifier) @name) @definition.method

(type_spec name: (type_identifier) @name type: (struct_type)) @definition.struct
(type_spec name: (type_identifier) @name type: (interface_type)) @definition.interface
(type_spec
  name: (type_identifier) @name
  type: [(type_identifier) (qualified_type) (generic_type) (pointer_type) (function_type) (map_type)
         (slice_type) (array_type) (channel_type) (negated_type) (parenthesized_type)]) @definition.type
(type_alias name: (type_identifier) @name) @definition.type

(interface_type (method_elem name: (field_identifier) @name) @definition.method)

; every name of a spec (the field form would only match the first of `A, B = 1, 2`)
(const_spec (identifier) @name) @definition.constant

(short_var_declaration
  left: (expression_list . (identifier) @name .)
  right: (expression_list . (func_literal) .)) @definition.function
(var_spec
  name: (identifier) @name .
  value: (expression_list . (func_literal) .)) @definition.function
