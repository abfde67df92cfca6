; C# definitions: classes and records, interfaces, structs (and record structs), enums, methods and constructors,
; namespaces (block and file-scoped, with their dotted name), and const fields.
(namespace_declaration name: (_) @name) @definition.module
(file_scoped_namespace_declaration name: (_) @name) @definition.module

(class_declaration name: (identifier) @name) @definition.class
(interface_declaration name: (identifier) @name) @definition.interface
(struct_declaration name: (identifier) @name) @definition.struct
(enum_declaration name: (identifier) @name) @definition.enum
((record_declaration "struct" name: (identifier) @name) @definition.struct
  (#match? @definition.struct "^(\\s*\\[[^\\]]*\\])*\\s*(\\w+\\s+)*record\\s+struct\\b"))
((record_declaration name: (identifier) @name) @definition.class
  (#not-match? @definition.class "^(\\s*\\[[^\\]]*\\])*\\s*(\\w+\\s+)*record\\s+struct\\b"))

(method_declaration name: (identifier) @name) @definition.method
(constructor_declaration name: (identifier) @name) @definition.method

; const fields: the whole field when it declares one constant, else each declarator on its own
(field_declaration
  (modifier "const")
  (variable_declaration type: (_) . (variable_declarator name: (identifier) @name) .)) @definition.constant
(field_declaration
  (modifier "const")
  (variable_declaration
    (variable_declarator name: (identifier) @name) @definition.constant
    (variable_declarator)))
(field_declaration
  (modifier "const")
  (variable_declaration
    (variable_declarator)
    (variable_declarator name: (identifier) @name) @definition.constant))
