; PHP definitions: classes, interfaces, traits, enums, functions, methods,
; and constants (top-level `const` and class constants).
(class_declaration name: (name) @name) @definition.class
(interface_declaration name: (name) @name) @definition.interface
(trait_declaration name: (name) @name) @definition.trait
(enum_declaration name: (name) @name) @definition.enum
(function_definition name: (name) @name) @definition.function
(method_declaration name: (name) @name) @definition.method

; const: the whole declaration when it declares one constant, else each element on its own
(const_declaration . (const_element (name) @name) .) @definition.constant
(const_declaration
  [(attribute_list) (final_modifier) (visibility_modifier) type: (_)]
  . (const_element (name) @name) .) @definition.constant
(const_declaration
  (const_element (name) @name) @definition.constant
  (const_element))
(const_declaration
  (const_element)
  (const_element (name) @name) @definition.constant)
